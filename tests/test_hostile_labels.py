"""Labels: an integer in [0, 2^31) or absent; anything else is recorded with its sample and the run goes on."""
from __future__ import annotations

import io

import numpy as np
import pytest
from _extract_fixtures import extract_config
from conftest import tiny_config
from PIL import Image
from wds_fixtures import good_samples, write_tar

from distill.evaluate import evaluate_model, load_eval_model
from extract.pipeline import run_extraction
from store_schema.cli import main as store_cli
from store_schema.shards import MAX_LABEL, parse_label
from store_schema.store import FeatureStore, unit_name
from store_schema.validate import validate_store

GOOD = [(b"0", 0), (b"7", 7), (b" 12\n", 12), (b"+4", 4), (b"007", 7), (b"-0", 0), (b"2147483647", MAX_LABEL)]
BAD = {  # bytes -> a word of the reason
    b"-5": "negative", b"-1": "negative", b"-2147483648": "negative",
    b"2147483648": "above", b"9223372036854775808": "above", b"9" * 5000: "above", b"1" + b"0" * 30: "above",
    b"abc": "not an integer", b"3.0": "not an integer", b"1e3": "not an integer", b"0x10": "not an integer",
    b"1_000": "not an integer", "٣".encode(): "not an integer", b"": "not an integer", b"\xff\xfe": "not an integer",
    b"--3": "not an integer", b"3 4": "not an integer", b"nan": "not an integer", b"inf": "not an integer",
}


@pytest.mark.parametrize("data, label", GOOD)
def test_valid_labels_parse(data, label):
    assert parse_label(data) == (label, None)


@pytest.mark.parametrize("data", list(BAD))
def test_invalid_labels_are_none_with_a_reason(data):
    label, why = parse_label(data)
    assert label is None and BAD[data] in why and "label set to None" in why
    assert len(why) < 200  # a 5000-digit label is quoted in part, not whole


def test_extraction_keeps_bad_label_samples_with_a_record(tmp_path):
    g = good_samples(2 + len(BAD), size=(30, 22))
    bad = list(BAD)
    samples = [{**g[0], "cls": b"3"}, {**g[1], "cls": b"2147483647"}]
    samples += [{**s, "cls": data} for s, data in zip(g[2:], bad)]
    tar = write_tar(tmp_path / "data" / "labels.tar", samples)
    cfg = extract_config(tmp_path, [tar])
    summary = run_extraction(cfg)  # no OverflowError, no abort: every sample is stored
    assert summary["errors"] == [] and summary["images"] == len(samples) and summary["skipped"] == 0
    store = FeatureStore.open(cfg.store.root)
    name = unit_name(str(tar))
    labels = store.array(f"units/{name}/label")[:]
    assert labels.tolist() == [3, MAX_LABEL] + [-1] * len(bad)
    notes = store.unit_record(name)["notes"]
    assert [n["key"] for n in notes] == [s["__key__"] for s in samples[2:]]  # one record per sample, in order
    assert all(BAD[d] in n["note"] for d, n in zip(bad, notes))
    assert validate_store(cfg.store.root) == []
    assert len(store.sample_notes()) == len(bad)


def test_inspect_shows_label_notes(tmp_path, capsys):
    g = good_samples(3, size=(30, 22))
    tar = write_tar(tmp_path / "data" / "l.tar", [{**g[0], "cls": b"-5"}, {**g[1], "cls": b"99999999999"}, g[2]])
    cfg = extract_config(tmp_path, [tar])
    run_extraction(cfg)
    assert store_cli(["inspect", cfg.store.root]) == 0
    out = capsys.readouterr().out
    assert "notes       2 stored samples" in out and "negative label" in out and "above the largest" in out


def _png(level: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 100, (28, 40, 3), dtype=np.uint8) + level
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_evaluation_with_huge_and_bad_labels(tmp_path):
    """Labels 0 and 2^31 - 1 evaluate exactly as 0 and 1 (no allocation per integer); bad ones are unlabelled."""
    def write(names: tuple[int, int], root):
        train = [{"__key__": f"t{i}", "png": _png(150 * (i % 2), i), "cls": names[i % 2]} for i in range(8)]
        train += [{"__key__": "neg", "png": _png(0, 50), "cls": b"-5"},
                  {"__key__": "big", "png": _png(0, 51), "cls": b"9" * 40}]
        test = [{"__key__": f"v{i}", "png": _png(150 * (i % 2), 100 + i), "cls": names[i % 2]} for i in range(4)]
        write_tar(root / "eval" / "train.tar", train)
        write_tar(root / "eval" / "test.tar", test)
        return tiny_config(root, [f'eval.train_urls=["{root}/eval/train.tar"]',
                                  f'eval.test_urls=["{root}/eval/test.tar"]', "eval.batch_size=4",
                                  "eval.knn_k=[1, 3]", "eval.probe_epochs=2", "eval.probe_batch_size=4"])
    results = []
    for names, sub in (((0, 1), "small"), ((0, MAX_LABEL), "huge")):
        cfg = write(names, tmp_path / sub)
        model, mean, std, _ = load_eval_model(cfg, random_init_seed=0)
        results.append(evaluate_model(model, cfg, mean, std))
    small, huge = results
    assert huge["protocol"]["num_classes"] == 2 and huge["skipped_unlabelled"] == 2
    for f in ("cls", "mean_patch"):
        assert huge[f] == small[f]
