"""Where extraction reads and writes, checked before any work: the input list and the object stores behind it."""
from __future__ import annotations

from store_schema.config import ConfigError, PipelineConfig
from store_schema.shards import ShardReadError, expand_urls
from store_schema.storage import check_reachable, remote_problem


def check_locations(cfg: PipelineConfig, storage_options: dict | None = None) -> list[str]:
    """The expanded input list, after one request each to the store's and the first input's object store
    (before any teacher is loaded): an unreachable endpoint, a missing bucket or missing credentials is one
    ConfigError naming the URL and the setting, not a failure of every tar or a traceback."""
    try:
        urls = expand_urls(cfg.data.urls, cfg.data.storage_options)
    except (ValueError, ShardReadError) as e:
        why = remote_problem(_list_url(cfg), e, "data.storage_options", cfg.data.storage_options)
        raise ConfigError(f"data.urls: {why or e}") from e
    try:
        check_reachable(cfg.store.root, storage_options, "store.storage_options")
        if urls:
            check_reachable(urls[0], cfg.data.storage_options, "data.storage_options")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return urls


def _list_url(cfg: PipelineConfig) -> str:
    """The first "@list" file of data.urls (what a remote failure while expanding them was reading), or ''."""
    return next((u.strip()[1:] for u in cfg.data.urls if u.strip().startswith("@")), "")
