"""Every number of the config has a range checked at load: NaN, inf and out-of-range values are named."""
from __future__ import annotations

import copy
import math
import tomllib

import pytest

from conftest import PIPELINE_TOML, REPO
from store_schema.config import ConfigError, config_from_dict, load_config

RAW = tomllib.loads(PIPELINE_TOML.read_text())


def _leaves(node, path=()):
    """(path, value) of every number in the shipped file (lists element by element)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


NUMBERS = list(_leaves(RAW))


def _key(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _with(path, value) -> dict:
    raw = copy.deepcopy(RAW)
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return raw


def _refused(path, value) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with(path, value), source="t.toml")
    msg = str(e.value)
    assert _key(path).split("[")[0] in msg, msg  # the message names the key
    return msg


def test_the_shipped_file_has_many_numbers():
    assert len(NUMBERS) >= 60  # so the tests below cover every number key, not a few


@pytest.mark.parametrize("path", [p for p, v in NUMBERS if isinstance(v, float)], ids=_key)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(path, bad):
    _refused(path, bad)


@pytest.mark.parametrize("path", [p for p, _ in NUMBERS], ids=_key)
@pytest.mark.parametrize("sign", [1, -1], ids=["huge", "-huge"])
def test_out_of_range_numbers_are_refused(path, sign):
    value = RAW
    for p in path:
        value = value[p]
    _refused(path, sign * (2**64 if isinstance(value, int) else 1e300))


@pytest.mark.parametrize("overrides, message", [
    (["store.compression=\"zstd\"", "store.compression_level=23"],
     "store.compression_level = 23 is outside its range [0, 22] with store.compression = 'zstd'"),
    (["store.compression_level=10"], "[0, 9] with store.compression = 'blosc'"),  # pipeline.toml's codec
    (["store.compression_level=-1"], "store.compression_level"),
    (["store.blosc_block_kib=-1"], "store.blosc_block_kib = -1 is outside its range [0, 65536]"),
    (["store.blosc_block_kib=65537"], "store.blosc_block_kib = 65537"),
    (["views.crop_ratio=[0.75, inf]"], "views.crop_ratio[1] = inf: every number must be finite"),
    (["views.crop_scale=[nan, 1.0]"], "views.crop_scale[0] = nan"),
    (["teachers.mocov3.mean=[0.4, nan, 0.4]"], "teachers.mocov3.mean[1] = nan"),
    (["teachers.ibot.std=[0.2, 0.2, inf]"], "teachers.ibot.std[2] = inf"),
    (["teachers.mae.std=[0.0, 0.2, 0.2]"], "teachers.mae.std"),
    (["student.mean=[nan, 0.4, 0.4]"], "student.mean[0] = nan"),
    (["student.std=[0.2, -0.2, 0.2]"], "student.std"),
    (["heads.decoder_mlp_ratio=-1.0"], "heads.decoder_mlp_ratio = -1.0 is outside its range"),
    (["heads.decoder_mlp_ratio=0.0"], "heads.decoder_mlp_ratio = 0.0"),
    (["seed=-1"], "seed = -1 is outside its range [0, 9223372036854775807]"),
    (["seed=9223372036854775808"], "seed"),
    (["eval.probe_lr=0.0"], "eval.probe_lr = 0.0"),
    (["eval.probe_lr=-0.1"], "eval.probe_lr"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas"),
    (["data.max_image_pixels=9223372036854775807"], "data.max_image_pixels"),
    (["views.num_views=100000"], "views.num_views = 100000"),
    (["student.arch_kwargs={drop_path_rate = nan}"], "student.arch_kwargs.drop_path_rate = nan"),
    (["teachers.mae.arch_kwargs={drop_path_rate = inf}"], "teachers.mae.arch_kwargs.drop_path_rate = inf"),
])
def test_the_reported_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(PIPELINE_TOML, overrides)
    assert message in str(e.value)


def test_the_boundaries_themselves_load():
    cfg = load_config(PIPELINE_TOML, ["store.compression=\"zstd\"", "store.compression_level=22",
                                      "seed=9223372036854775807",
                                      "heads.decoder_mlp_ratio=64.0", "views.crop_ratio=[0.001, 1000.0]"])
    assert cfg.store.compression_level == 22 and cfg.seed == 2**63 - 1
    load_config(PIPELINE_TOML, ["store.compression=\"blosc\"", "store.compression_level=9"])
    blocks = [load_config(PIPELINE_TOML, [f"store.blosc_block_kib={k}"]).store.blosc_block_kib for k in (0, 65536)]
    assert blocks == [0, 65536]
    load_config(REPO / "distill" / "demo" / "demo.toml")
