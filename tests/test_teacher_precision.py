"""store.teacher_precision: the teachers' forward under bf16 autocast when writing a store (issue 14, item 5).

On the CPU always (bf16 autocast runs there too, slowly); the CUDA case, the smoke test of extraction on a
GPU, is skipped without one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _extract_fixtures import all_rows, extract_config, write_tars

from extract.pipeline import run_extraction
from store_schema.fingerprint import StoreMismatchError
from store_schema.store import FeatureStore

SIZES = [5, 3]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A float32 store written by float32 teachers on the CPU: (tmp, tars, rows)."""
    tmp = tmp_path_factory.mktemp("precision")
    tars = write_tars(tmp, SIZES)
    cfg = extract_config(tmp, tars, ['store.dtype="float32"'])
    run_extraction(cfg)
    return tmp, tars, all_rows(FeatureStore.open(cfg.store.root))


def _bf16_rows(tmp, tars, store: str) -> dict:
    cfg = extract_config(tmp, tars, ['store.dtype="float32"', 'store.teacher_precision="bf16"'], store=store)
    summary = run_extraction(cfg)
    assert summary["images"] == sum(SIZES) and summary["skipped"] == 0
    return all_rows(FeatureStore.open(cfg.store.root))


def _assert_bf16_close(ref: dict, got: dict) -> None:
    """Same samples, views and tokens; features rounded (not equal) but within bf16's precision."""
    assert ref.keys() == got.keys()
    for k, r in ref.items():
        for t, feats in r["teachers"].items():
            g = got[k]["teachers"][t]
            assert np.array_equal(g["idx"], feats["idx"])
            for part in ("patch", "cls"):
                assert _cosine(g[part], feats[part]).min() > 0.999, (k, t, part)
    diff = [np.abs(got[k]["teachers"][t]["patch"] - r["teachers"][t]["patch"]).max()
            for k, r in ref.items() for t in r["teachers"]]
    assert max(diff) > 0  # the forward did run in bf16


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_teachers_store_the_same_samples_with_features_within_bf16_rounding(reference, device, monkeypatch):
    tmp, tars, ref = reference
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # extraction picks the GPU when there is one
    _assert_bf16_close(ref, _bf16_rows(tmp, tars, f"store-bf16-{device}"))


def test_a_store_keeps_its_teacher_precision(reference):
    tmp, tars, _ = reference
    for first, second, message in (("float32", "bf16", "teacher_precision: missing in the store, expected 'bf16'"),
                                   ("bf16", "float32", "teacher_precision: store has 'bf16'")):
        store = f"store-{first}-then-{second}"
        run_extraction(extract_config(tmp, tars[:1], [f'store.teacher_precision="{first}"'], store=store))
        with pytest.raises(StoreMismatchError) as e:
            run_extraction(extract_config(tmp, tars, [f'store.teacher_precision="{second}"'], store=store))
        assert message in str(e.value)


def test_bf16_on_a_gpu_without_bf16_is_a_config_error(reference, monkeypatch):
    from extract.pipeline import load_teachers
    from store_schema.config import ConfigError
    tmp, tars, _ = reference
    cfg = extract_config(tmp, tars, ['store.teacher_precision="bf16"'])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has no bf16 support"):
        load_teachers(cfg, torch.device("cuda"))  # refused before anything touches the device
