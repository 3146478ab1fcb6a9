"""Stage 1: run the teachers once over a WebDataset and write the feature store.

The unit of work is one input tar: rank r of W processes takes tars r, r+W, ... whole, so no two
processes ever write into one unit (the store's write rules: store_schema/README.md). Three things
overlap: DataLoader workers decode tars and prepare views, masks and student pixels; the main thread runs
the teachers; a background thread writes the units (zarr compression and I/O; extract/writer_thread.py).

Decisions a user meets:
- A complete unit is skipped on a rerun (resume); an incomplete one is redone from scratch.
- A sample that cannot be used (undecodable, no image, duplicate key, decompression bomb, non-finite
  teacher output, ...) is skipped and recorded in its unit with the reason (`store.skipped()`).
  A damaged tar keeps the samples read before the damage; an empty tar is a complete unit with one
  record "empty tar". Records about the whole rest of a tar have key None and the index of the first
  sample they cover.
- A tar that cannot be opened or read (missing file, I/O error) is recorded as a unit with status
  "failed" and its reason, NOT marked complete: the run finishes the other tars, then stops with an
  error naming it. A rerun retries it (a missing file may reappear) and keeps every complete unit.
- data.max_failure_fraction bounds skipped / (stored + skipped) samples, counted over this process's
  units including those completed by earlier runs (so a rerun stops again at the same place); checked
  after every unit and, over all processes, at the end.
- A key stored by more than one unit: a unit stored by an earlier run with other inputs keeps it, else the
  unit first in input order; later rows are excluded (store.exclude_rows, reason names the other unit;
  extract/resume.py). Their features stay in the statistics.
- On an existing store, its layout (shard/chunk size, compression) and data.max_image_pixels stay in force;
  a configuration asking for others gets a warning naming the key and the value in force (extract/resume.py).
- data.batch_size counts images per teacher forward: a batch holds max(1, batch_size // num_views)
  samples of one tar, all views each.
- The run summary is appended to the attributes of the store group `extract_runs` (key "runs").
- A killed run (preempted, SIGKILL) is resumed by rerunning the same command: the dead process's lock is
  taken over, incomplete units are redone. A decoding worker that dies alone stops the run with an
  ExtractionError (exit 1), keeping the complete units. Fault points for the tests
  (store_schema/faults.py): decode (in the worker, per decoded sample), teacher_forward (per call),
  between_units (after a unit's commit); shard_write is in store_schema/writer.py, stats_merge in
  store_schema/store.py.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from extract.inputs import check_locations
from extract.prepare import Chunk, PreparedTars, teacher_forward
from extract.progress import Progress
from extract.resume import changed_sources, exclude_duplicate_keys, settle_config
from extract.writer_thread import BackgroundWriter, ExtractionError
from store_schema.collective import gather_objects, identity
from store_schema.config import ConfigError, PipelineConfig
from store_schema.faults import fault_point
from store_schema.fingerprint import StoreMismatchError, diff_fingerprints, fingerprint_from_config
from store_schema.inspection import RUNS_GROUP
from store_schema.joint_stats import fit_joint_stats
from store_schema.lock import acquire_writer_lock, release_writer_lock, remove_dead_writer_temporaries
from store_schema.oserrors import STORE_OS_ERRORS, explain, raise_store_error
from store_schema.skips import SkipKind
from store_schema.store import FeatureStore, StoreError, TeacherMeta, unit_name
from store_schema.writer import TeacherRows, UnitRows
from vit_layers.checkpoints import load_teacher

log = logging.getLogger("comad.extract")
SUMMARY_GROUP = RUNS_GROUP  # the run summaries: attrs["runs"], one dict per finished run
# A process that finished its tars waits at the closing collective for the slowest one (a resumed run can
# leave one process hours of work and another none); the 30-minute default would kill the run.
COLLECTIVE_TIMEOUT = timedelta(days=7)


# ---------------------------------------------------------------------------------------------- loading

def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode with PIL; torch threads would only fight the teachers for cores


# ---------------------------------------------------------------------------------------------- processes

_GROUP = None  # the gloo process group used for the few small collectives of a run


def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world, we_initialised) from the torchrun / accelerate environment; gloo for our collectives."""
    global _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        _GROUP = None
    else:  # e.g. accelerate's NCCL group, with its timeout: ours carries Python objects on CPU
        _GROUP = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), own


def _agree(fn: Callable[[], Any], world: int) -> Any:
    """Run fn on every rank; if it fails anywhere, every rank raises (no process is left waiting)."""
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001 — re-raised below, after the other ranks know
        out, err = None, e
    msgs = gather_objects(None if err is None else f"{type(err).__name__}: {err}", world, _GROUP)
    if err is not None:
        raise err
    failed = [f"process {r}: {m}" for r, m in enumerate(msgs) if m]
    if failed:
        raise ExtractionError("another process failed:\n  " + "\n  ".join(failed))
    return out


def load_teachers(cfg: PipelineConfig,
                  device: torch.device) -> tuple[dict[str, torch.nn.Module], dict[str, TeacherMeta]]:
    """Every teacher of cfg, frozen, on `device`, with its store metadata; unusable weights are a ConfigError."""
    if cfg.store.teacher_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"store.teacher_precision = 'bf16', but {torch.cuda.get_device_name(device)} has no bf16 "
                          "support: set it to \"float32\"")
    models, metas = {}, {}
    for name, tc in cfg.teachers.items():
        try:
            model, sha = load_teacher(tc, cfg.data.image_size, cfg.data.patch_size)
        except (ValueError, OSError, RuntimeError) as e:  # missing file, wrong format, no network for a timm tag
            raise ConfigError(f"teachers.{name}: cannot load its weights: {e}") from e
        models[name] = model.to(device)
        metas[name] = TeacherMeta(int(model.embed_dim), cfg.teacher_tokens(name), sha)
    return models, metas


def _open_as_follower(cfg: PipelineConfig, metas: dict[str, TeacherMeta], storage_options: dict | None) -> FeatureStore:
    store = FeatureStore.open(cfg.store.root, mode="r+", storage_options=storage_options)
    expected = fingerprint_from_config(cfg, {k: m.weights_sha256 for k, m in metas.items()})
    diffs = diff_fingerprints(store.fingerprint, expected)
    if diffs:
        raise StoreMismatchError(f"{cfg.store.root}: this process's configuration or teacher weights differ "
                                 "from the store rank 0 opened:\n  - " + "\n  - ".join(diffs))
    return store


# ---------------------------------------------------------------------------------------------- the run

def run_extraction(cfg: PipelineConfig, storage_options: dict | None = None,
                   redo_changed: bool = False) -> dict[str, Any]:
    """Extract every input tar of cfg.data.urls into the store at cfg.store.root; returns the run summary.

    Works as one process or under torchrun / `accelerate launch` (WORLD_SIZE > 1; gloo collectives).
    Raises ExtractionError when tars could not be read or too many samples were skipped (the complete
    units are kept: rerun to resume), StoreError / StoreMismatchError for store problems. An input whose
    size or mtime/ETag differs from when its complete unit was written is refused (StoreError naming it)
    unless `redo_changed`, which re-extracts it.
    """
    rank, world, own_group = _init_distributed()
    if storage_options is None:
        storage_options = cfg.store.storage_options or None
    try:
        return _run(cfg, storage_options, rank, world, redo_changed)
    except STORE_OS_ERRORS as e:  # a full disk, no permission, a torn zarr.json: one line, not a traceback
        raise_store_error(cfg.store.root, e)
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(cfg: PipelineConfig, storage_options: dict | None, rank: int, world: int,
         redo_changed: bool) -> dict[str, Any]:
    started = time.time()
    urls = check_locations(cfg, storage_options)
    mine = urls[rank::world]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    models, metas = _agree(lambda: load_teachers(cfg, device), world)
    run_id = gather_objects(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", world, _GROUP)[0]
    # Rank 0 creates the root metadata and takes the lock before any other process opens the store.
    store = _agree(lambda: _create_and_lock(cfg, metas, storage_options, run_id) if rank == 0 else None, world)
    try:
        if rank != 0:
            store = _agree(lambda: _open_as_follower(cfg, metas, storage_options), world)
        else:
            _agree(lambda: None, world)
        cfg, warnings = settle_config(cfg, store, repair=rank == 0)  # the store's layout and pixel limit stay
        for w in warnings if rank == 0 else []:
            log.warning("%s", w)
        try:
            local, err = _extract_units(cfg, store, models, mine, rank, redo_changed), None
        except Exception as e:  # noqa: BLE001 — reported to every rank, raised below
            local, err = None, e
        results = gather_objects({"rank": rank, "result": local,
                                  "error": None if err is None else _describe(err, rank, world)}, world, _GROUP)
        try:
            summary = _agree(lambda: (_finish(cfg, store, urls, results, run_id, started, warnings)
                                      if rank == 0 else None), world)
        except Exception as e:  # noqa: BLE001 — e.g. the disk that stopped the writer also fails the merge
            if err is None:
                raise
            log.error("closing the run failed too: %s", explain(cfg.store.root, e) or f"{type(e).__name__}: {e}")
            raise err from None  # the first failure is the one to report
        summary = gather_objects(summary, world, _GROUP)[0]
    finally:
        if rank == 0:
            release_writer_lock(store, run_id)
    if err is not None:
        raise err
    problems = summary["errors"]
    if problems:
        raise ExtractionError("extraction did not complete:\n  - " + "\n  - ".join(problems) +
                              "\nComplete units are kept; fix the cause and rerun the same command to resume.")
    return summary


def _create_and_lock(cfg: PipelineConfig, metas: dict[str, TeacherMeta], storage_options: dict | None,
                     run_id: str) -> FeatureStore:
    store = FeatureStore.create(cfg.store.root, cfg, metas, storage_options=storage_options)
    acquire_writer_lock(store, run_id)
    remove_dead_writer_temporaries(store)
    return store


def _unit_counts(store: FeatureStore, url: str) -> tuple[int, int]:
    rec = store.unit_record(unit_name(url))
    return int(rec.get("n_samples", 0)), len(rec.get("skipped", []))


def _extract_units(cfg: PipelineConfig, store: FeatureStore, models: dict[str, torch.nn.Module],
                   mine: list[str], rank: int, redo_changed: bool = False) -> dict[str, Any]:
    """This process's tars -> units. Returns its counts; raises ExtractionError past max_failure_fraction."""
    pending, stored, skipped = _pending_units(cfg, store, mine, redo_changed)
    _check_failures(cfg, stored, skipped)  # units kept from earlier runs already exceed it: stop before working
    per_chunk = max(1, cfg.data.batch_size // cfg.views.num_views)
    loader = DataLoader(PreparedTars(cfg, pending, per_chunk), batch_size=None, collate_fn=identity,
                        num_workers=cfg.data.num_workers, worker_init_fn=_worker_init)
    chunks = iter(loader) if pending else iter(())  # fork the decoding workers before the writer thread exists
    writer = BackgroundWriter(store)
    out = {"images": 0, "reasons": Counter(), "notes": [], "failed": [], "opened": set(), "seconds": 0.0}
    progress = Progress(len(mine), len(mine) - len(pending), show=rank == 0)
    t0 = time.time()
    try:
        for chunk in chunks:
            url = chunk.url
            if chunk.error is not None:
                writer.fail(url, chunk.error)
                out["failed"].append({"url": url, "reason": chunk.error})
                progress.tar_done(out["images"])
                continue
            n_stored, n_skipped = _write_chunk(cfg, models, writer, chunk, out)
            stored, skipped = stored + n_stored, skipped + n_skipped
            if chunk.last:
                writer.commit(url, chunk.source)
                progress.tar_done(out["images"])
                _check_failures(cfg, stored, skipped)
    except BaseException as e:
        writer.close(check=False)  # units whose commit is already queued still complete
        progress.bar.close()
        if isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker"):  # torch's words for a dead worker
            # Blocked on the data queue, torch reports "exited unexpectedly"; how it died is in the cause.
            how = f"{e}: {e.__cause__}" if isinstance(e.__cause__, RuntimeError) else str(e)
            raise ExtractionError(f"a decoding worker died: {how.strip().rstrip('.')} (e.g. for memory?). Complete "
                                  "units are kept; rerun the same command to resume (fewer data.num_workers uses "
                                  "less memory).") from e
        raise
    writer.close()
    progress.bar.close()
    out["seconds"] = time.time() - t0
    return {"images": out["images"], "reasons": dict(out["reasons"]), "notes": out["notes"], "failed": out["failed"],
            "committed": writer.committed, "stored_total": stored, "skipped_total": skipped,
            "already_complete": len(mine) - len(pending), "seconds": out["seconds"]}


def _pending_units(cfg: PipelineConfig, store: FeatureStore, mine: list[str],
                   redo_changed: bool) -> tuple[list[str], int, int]:
    """(the tars of `mine` to extract, samples stored and skipped in the complete units of the others)."""
    changed = set(changed_sources(store, mine, redo_changed, cfg.data.storage_options))  # refused unless redo_changed
    pending = [u for u in mine if u in changed or not store.is_complete(u)]
    stored = skipped = 0
    for url in mine:
        if url not in pending:
            n, s = _unit_counts(store, url)
            stored, skipped = stored + n, skipped + s
    return pending, stored, skipped


def _write_chunk(cfg: PipelineConfig, models: dict[str, torch.nn.Module], writer: BackgroundWriter,
                 chunk: Chunk, out: dict[str, Any]) -> tuple[int, int]:
    """One decoded chunk's notes, skips and teacher rows, queued on the writer and counted in `out`
    -> (samples stored, samples skipped)."""
    url = chunk.url
    if url not in out["opened"]:
        out["opened"].add(url)
        writer.open(url)
    out["notes"] += [f"{url}[{i}] {key}: {note}" for i, key, note in chunk.notes]
    for i, key, note in chunk.notes:
        writer.note(url, i, key, note)
    rows, bad = _teacher_rows(cfg, models, chunk) if chunk.keys else (None, [])
    for index, key, kind, reason in chunk.skips + bad:
        writer.skip(url, index, key, reason, kind)
        out["reasons"][kind.value] += 1
    if rows is not None and len(rows):
        writer.rows(url, rows)
        out["images"] += len(rows)
    return 0 if rows is None else len(rows), len(chunk.skips) + len(bad)


def _describe(err: Exception, rank: int, world: int) -> str:
    text = str(err) if isinstance(err, ExtractionError) else f"{type(err).__name__}: {err}"
    return f"process {rank}: {text}" if world > 1 else text


def _check_failures(cfg: PipelineConfig, stored: int, skipped: int, where: str = "") -> None:
    total = stored + skipped
    if total and skipped / total > cfg.data.max_failure_fraction:
        raise ExtractionError(
            f"{where}{skipped} of {total} inputs were skipped ({skipped / total:.2%}), above "
            f"data.max_failure_fraction = {cfg.data.max_failure_fraction}. See the reasons with `comad-store "
            f"inspect {cfg.store.root}`; fix the data or raise data.max_failure_fraction, then rerun to resume.")


def _teacher_rows(cfg: PipelineConfig, models: dict[str, torch.nn.Module], c: Chunk) -> tuple[UnitRows, list]:
    """Run every teacher on one chunk: rows of the samples whose features are all finite, skips for the rest."""
    m, V = len(c.keys), cfg.views.num_views
    images = c.images.reshape(m * V, *c.images.shape[2:])
    feats: dict[str, TeacherRows] = {}
    bad: dict[int, list[str]] = {}
    for name, model in models.items():
        tc = cfg.teachers[name]
        idx = c.teacher_idx[name]  # (m, V, Kt)
        cls, patch = teacher_forward(model, images, torch.from_numpy(idx.reshape(m * V, -1)), tc.mean, tc.std,
                                     cfg.store.teacher_precision)
        fault_point("teacher_forward")
        patch = patch.cpu().numpy().reshape(m, V, idx.shape[-1], -1)
        cls = cls.cpu().numpy().reshape(m, V, -1)
        finite = np.isfinite(patch).all(axis=(1, 2, 3)) & np.isfinite(cls).all(axis=(1, 2))
        for i in np.flatnonzero(~finite):
            bad.setdefault(int(i), []).append(name)
        feats[name] = TeacherRows(idx, patch, cls)
    keep = np.array([i not in bad for i in range(m)])
    rows = UnitRows(
        keys=[k for k, ok in zip(c.keys, keep) if ok], index=c.index[keep], label=c.label[keep], views=c.views[keep],
        student_idx=c.student_idx[keep], student_pixels=c.student_pixels.numpy()[keep],
        teachers={t: TeacherRows(r.idx[keep], r.patch[keep], r.cls[keep]) for t, r in feats.items()})
    skips = [(int(c.index[i]), c.keys[i], SkipKind.NON_FINITE, f"non-finite features from teacher(s) {', '.join(ts)}")
             for i, ts in sorted(bad.items())]
    return rows, skips


# ---------------------------------------------------------------------------------------------- closing

def _fit_joint_stats(cfg: PipelineConfig, store: FeatureStore) -> str:
    """Cross-teacher statistics for the shared target basis (store_schema.joint_stats), read back from the store."""
    try:
        rec = fit_joint_stats(store, cfg.store.joint_stats_samples)
    except StoreError as e:  # e.g. too few samples yet: training names the command that adds them later
        return f"not computed: {e}"
    return f"{rec['samples']} samples, {rec['count']} co-visible tokens"


def _finish(cfg: PipelineConfig, store: FeatureStore, urls: list[str], results: list[dict], run_id: str,
            started: float, warnings: list[str]) -> dict[str, Any]:
    """Rank 0, after every process: exclude duplicates, merge statistics, build and record the summary."""
    ok = [r["result"] for r in results if r["result"] is not None]
    errors = [r["error"] for r in results if r["error"]]
    failed = [f for r in ok for f in r["failed"]]
    errors += [f"input tar not read: {f['reason']} (recorded as a failed unit; a rerun retries it)" for f in failed]
    duplicates = exclude_duplicate_keys(store, urls, [c["unit"] for r in ok for c in r["committed"]])
    counts = store.finalize_stats()
    joint = _fit_joint_stats(cfg, store)
    if joint.startswith("not computed"):  # e.g. a damaged unit found while reading back: say it, not only record it
        log.warning("cross-teacher statistics %s", joint)
    stored, skipped = sum(r["stored_total"] for r in ok), sum(r["skipped_total"] for r in ok)
    if not errors:
        try:
            _check_failures(cfg, stored, skipped, "over all processes: ")
        except ExtractionError as e:
            errors.append(str(e))
    reasons: Counter = Counter()
    for r in ok:
        reasons.update(r["reasons"])
    images = sum(r["images"] for r in ok)
    seconds = max([r["seconds"] for r in ok] + [1e-9])
    notes = [n for r in ok for n in r["notes"]]
    summary = {
        "run_id": run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": len(results), "tars": len(urls),
        "tars_extracted": sum(len(r["committed"]) for r in ok),
        "tars_already_complete": sum(r["already_complete"] for r in ok), "tars_failed": failed,
        "images": images, "views": images * cfg.views.num_views,
        "skipped": sum(reasons.values()), "skipped_by_reason": dict(sorted(reasons.items())),
        "duplicate_keys_excluded": duplicates,
        "joint_stats": joint,
        "store_images": sum(u.n_samples - len(u.excluded_rows) for u in store.units()),
        "failure_fraction": skipped / max(stored + skipped, 1),
        "bytes_written": sum(c["bytes"] for r in ok for c in r["committed"]),
        "seconds": round(time.time() - started, 3), "images_per_s": round(images / seconds, 2),
        "stats_count": counts, "notes": notes[:20], "notes_total": len(notes),
        "units_by_rank": {str(r["rank"]): [c["unit"] for c in (r["result"] or {}).get("committed", [])]
                          for r in results},
        "config_ignored": warnings, "errors": errors,
    }
    group = store.group.require_group(SUMMARY_GROUP)
    group.attrs.put({"runs": list(dict(group.attrs).get("runs", [])) + [summary]})
    _log_summary(summary)
    return summary


def _log_summary(s: dict[str, Any]) -> None:
    log.info("extraction: %d images (%d views) from %d tars (%d already complete, %d failed) in %.1f s, %.1f images/s",
             s["images"], s["views"], s["tars_extracted"], s["tars_already_complete"], len(s["tars_failed"]),
             s["seconds"], s["images_per_s"])
    log.info("skipped %d inputs%s; %d duplicate keys excluded; %.1f MB written", s["skipped"],
             "".join(f", {k}: {v}" for k, v in s["skipped_by_reason"].items()), s["duplicate_keys_excluded"],
             s["bytes_written"] / 1e6)  # errors: raised to the caller, which reports them
