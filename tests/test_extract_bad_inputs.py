"""Every kind of bad input ends skipped and recorded with its reason; too many skips stop the run."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import extract.prepare as prepare
from _extract_fixtures import all_rows, extract_config
from extract.pipeline import SUMMARY_GROUP, ExtractionError, run_extraction
from store_schema.store import FeatureStore, unit_name
from wds_fixtures import (good_samples, make_image_bytes, make_png_header_bytes, member_offsets, truncate,
                          write_members, write_tar)


def black_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24)).save(buf, "PNG")
    return buf.getvalue()


def nan_on_constant_images(monkeypatch):
    """Teachers return NaN for constant images (stand-in for a teacher that overflows on some inputs)."""
    real = prepare.forward_visible

    def fake(model, images, keep_idx):
        cls, patch = real(model, images, keep_idx)
        const = (images.amax(dim=(2, 3)) == images.amin(dim=(2, 3))).all(dim=1)  # (B,) flat in every channel
        return cls.masked_fill(const[:, None], float("nan")), patch.masked_fill(const[:, None, None], float("inf"))

    monkeypatch.setattr(prepare, "forward_visible", fake)


@pytest.fixture
def bad_inputs(tmp_path):
    g = good_samples(3, size=(30, 22))
    mixed = [
        g[0],
        {"__key__": "undecodable", "jpg": b"this is not a jpeg"},
        {"__key__": "mode_L", "png": make_image_bytes("L", (26, 20), "png")},
        {"__key__": "mode_CMYK", "jpg": make_image_bytes("CMYK", (26, 20), "jpg")},
        {"__key__": "mode_RGBA", "png": make_image_bytes("RGBA", (26, 20), "png")},
        {"__key__": "mode_P", "png": make_image_bytes("P", (26, 20), "png")},
        {"__key__": "mode_I16", "png": make_image_bytes("I;16", (26, 20), "png")},
        {"__key__": "tiny", "png": make_image_bytes("RGB", (3, 2), "png")},
        {**g[0], "cls": 7},  # key 000000 again in the same tar
        {"__key__": "text_only", "txt": "no image here"},
        {"__key__": "bomb", "png": make_png_header_bytes(20000, 20000)},
        {"__key__": "black", "png": black_png()},
        g[1],
    ]
    tars = {"mixed": write_tar(tmp_path / "data" / "a-mixed.tar", mixed)}
    cut = write_tar(tmp_path / "data" / "b-truncated.tar", good_samples(4, start=100))
    start, _ = member_offsets(cut)["000102.cls"]
    tars["truncated"] = truncate(cut, start - 512 + 100)  # inside the header of sample 2's second member
    tars["empty"] = write_members(tmp_path / "data" / "c-empty.tar", [])
    tars["dup_across"] = write_tar(tmp_path / "data" / "d-dup.tar", [{**g[0], "cls": 5}, g[2]])
    tars["missing"] = tmp_path / "data" / "e-missing.tar"
    return tmp_path, tars


def test_each_bad_input_is_recorded_with_its_reason(bad_inputs, monkeypatch):
    tmp, tars = bad_inputs
    nan_on_constant_images(monkeypatch)
    cfg = extract_config(tmp, list(tars.values()))
    with pytest.raises(ExtractionError, match=r"(?s)input tar not read: .*e-missing.tar.*rerun"):
        run_extraction(cfg)
    store = FeatureStore.open(cfg.store.root)
    reasons = {(s["source"].rsplit("/", 1)[-1], s["key"]): s["reason"] for s in store.skipped()}
    assert "undecodable image" in reasons[("a-mixed.tar", "undecodable")]
    assert "duplicate key '000000'" in reasons[("a-mixed.tar", "000000")]
    assert "no image member" in reasons[("a-mixed.tar", "text_only")]
    assert "decompression bomb" in reasons[("a-mixed.tar", "bomb")]
    assert reasons[("a-mixed.tar", "black")] == "non-finite features from teacher(s) mae, mocov3, ibot"
    assert "incomplete sample" in reasons[("b-truncated.tar", "000102")]
    assert "truncated or corrupt tar after 3 samples" in reasons[("b-truncated.tar", None)]
    assert reasons[("c-empty.tar", None)] == "empty tar: no samples"
    dup = reasons[("d-dup.tar", "000000")]
    assert f"already stored by unit {unit_name(str(tars['mixed']))}" in dup and "a-mixed.tar" in dup
    assert "cannot open input tar" in reasons[("e-missing.tar", None)]
    assert len(reasons) == len(store.skipped()) == 10

    # odd modes are converted and tiny images upsampled: stored, like the good samples
    stored = {k for (k, v) in all_rows(store) if v == 0}
    assert stored == {"000000", "mode_L", "mode_CMYK", "mode_RGBA", "mode_P", "mode_I16", "tiny", "000001",
                      "000100", "000101", "000002"}
    rows = all_rows(store)
    assert rows[("000000", 0)]["source"] == str(tars["mixed"]) and rows[("000002", 0)]["index"] == 1
    assert rows[("tiny", 1)]["pixels"].shape == (cfg.student_tokens, 3, 8, 8)
    units = {u.source.rsplit("/", 1)[-1]: u for u in store.units(complete_only=False)}
    assert units["c-empty.tar"].complete and units["c-empty.tar"].n_samples == 0
    assert not units["e-missing.tar"].complete and store.unit_record(units["e-missing.tar"].name)["status"] == "failed"
    assert units["d-dup.tar"].excluded_rows == (0,)
    # statistics cover exactly the complete units' stored rows (excluded duplicates included)
    assert store.teacher_stats("mae").count == 12 * 2 * cfg.teacher_tokens("mae")

    summary = dict(store.group[SUMMARY_GROUP].attrs)["runs"][-1]
    assert summary["images"] == 12 and summary["duplicate_keys_excluded"] == 1
    assert summary["skipped_by_reason"] == {"decompression bomb": 1, "duplicate key": 1, "empty tar": 1,
                                            "incomplete sample": 1, "no image member": 1, "non-finite": 1,
                                            "truncated or corrupt tar": 1, "undecodable image": 1}
    assert len(summary["tars_failed"]) == 1 and "e-missing.tar" in summary["errors"][0]

    # the missing tar appears: a rerun retries only it, keeps the rest, and the duplicate stays excluded once
    write_tar(tars["missing"], good_samples(2, start=200))
    summary = run_extraction(cfg)
    assert summary["tars_extracted"] == 1 and summary["tars_already_complete"] == 4 and summary["errors"] == []
    assert summary["store_images"] == 13  # 14 rows stored, one of them an excluded duplicate
    store = FeatureStore.open(cfg.store.root)
    assert all(u.complete for u in store.units(complete_only=False))
    assert len(store.skipped()) == 9 and summary["duplicate_keys_excluded"] == 0
    assert {k for (k, v) in all_rows(store) if v == 0} == stored | {"000200", "000201"}


def test_failure_fraction_exceeded_stops_the_run(tmp_path):
    samples = good_samples(2) + [{"__key__": "bad1", "jpg": b"x"}, {"__key__": "bad2", "jpg": b"y"}]
    first = write_tar(tmp_path / "data" / "t-0.tar", samples)
    second = write_tar(tmp_path / "data" / "t-1.tar", good_samples(2, start=10))
    cfg = extract_config(tmp_path, [first, second], ["data.max_failure_fraction=0.25"])
    with pytest.raises(ExtractionError, match=r"2 of 4 inputs were skipped \(50.00%\).*max_failure_fraction = 0.25"):
        run_extraction(cfg)
    store = FeatureStore.open(cfg.store.root)
    assert store.is_complete(str(first)) and not store.is_complete(str(second))  # stopped after the bad unit
    # a rerun counts the kept unit's skips again: it stops again instead of silently passing
    with pytest.raises(ExtractionError, match="2 of 4 inputs"):
        run_extraction(cfg)
    # 2 of 6 over both tars: allowed at 0.5
    summary = run_extraction(extract_config(tmp_path, [first, second], ["data.max_failure_fraction=0.5"]))
    assert summary["store_images"] == 4 and summary["failure_fraction"] == pytest.approx(2 / 6)


def test_non_finite_check_covers_patch_tokens(tmp_path, monkeypatch):
    """A NaN in a single patch token of one view is enough to skip that sample (and only it)."""
    real = prepare.forward_visible
    calls = {"n": 0}

    def fake(model, images, keep_idx):
        cls, patch = real(model, images, keep_idx)
        calls["n"] += 1
        if calls["n"] == 2:  # the second teacher of the first batch: sample 1, view 1, one token
            patch = patch.clone()
            patch[3, -1, 0] = float("nan")
        return cls, patch

    monkeypatch.setattr(prepare, "forward_visible", fake)
    tar = write_tar(tmp_path / "data" / "t.tar", good_samples(4))
    run_extraction(extract_config(tmp_path, [tar]))
    store = FeatureStore.open(str(tmp_path / "store"))
    assert [(s["key"], s["index"], s["reason"]) for s in store.skipped()] == \
        [("000001", 1, "non-finite features from teacher(s) mocov3")]
    assert store.units()[0].n_samples == 3 and np.isfinite(store.teacher_stats("mocov3").mean).all()
    block = store.read_block(store.units()[0].name, 0, 3, 1)
    assert block["index"].tolist() == [0, 2, 3] and np.isfinite(block["teachers"]["mocov3"]["patch"]).all()
