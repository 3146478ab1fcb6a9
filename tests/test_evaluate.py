"""Evaluation: DINO kNN against a loop reference, the linear probe, feature extraction from tars, end to end."""
from __future__ import annotations

import io
import json
import math
from argparse import Namespace

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import tiny_config
from PIL import Image
from wds_fixtures import make_image_bytes, write_tar

from distill.evaluate import (
    eval_transform,
    evaluate_model,
    extract_eval_features,
    knn_classify,
    linear_probe,
    load_eval_model,
    main_eval,
    resize_size,
)
from distill.export import export_student
from distill.student import build_student
from store_schema.config import dumps_toml
from vit_layers.checkpoint_writers import save_in_official_format
from vit_layers.checkpoints import build_vit
from vit_layers.forward import forward_visible

# ----------------------------------------------------------------------------------------------
# kNN


def knn_reference(train_f, train_y, test_f, test_y, k, temperature, num_classes):
    """One test sample at a time, in float64: explicit cosine, full sort, weighted votes."""
    tr, te = train_f.double().numpy(), test_f.double().numpy()
    correct = 0
    for i in range(len(te)):
        sims = [float(te[i] @ tr[j] / (np.linalg.norm(te[i]) * np.linalg.norm(tr[j]))) for j in range(len(tr))]
        order = sorted(range(len(tr)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_y[j])] += math.exp(sims[j] / temperature)
        correct += int(max(range(num_classes), key=lambda c: (votes[c], -c)) == int(test_y[i]))
    return correct / len(te)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_loop_reference(temperature):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    test_y = torch.randint(0, 4, (25,), generator=g)
    train_f = centers[train_y] + 1.5 * torch.randn(60, 8, generator=g)  # overlapping: accuracies are not 0 or 1
    test_f = centers[test_y] + 1.5 * torch.randn(25, 8, generator=g)
    ks = [1, 5, 10, 20]
    got = knn_classify(train_f * 3.0, train_y, test_f, test_y, ks, temperature, 4, chunk_size=7)  # scale-free
    for k in ks:
        ref = knn_reference(train_f, train_y, test_f, test_y, k, temperature, 4)
        assert got[k] == pytest.approx(ref, abs=1e-12), k
        assert 0.0 < ref < 1.0
    for i in range(10):  # per sample, so that compensating errors cannot hide
        one = knn_classify(train_f, train_y, test_f[i:i + 1], test_y[i:i + 1], [10], temperature, 4)
        assert one[10] == knn_reference(train_f, train_y, test_f[i:i + 1], test_y[i:i + 1], 10, temperature, 4)


def test_knn_separable_clusters_is_perfect():
    g = torch.Generator().manual_seed(1)
    centers = torch.eye(5, 16) * 10
    train_y, test_y = torch.arange(5).repeat(20), torch.arange(5).repeat(6)
    train_f = centers[train_y] + 0.1 * torch.randn(100, 16, generator=g)
    test_f = centers[test_y] + 0.1 * torch.randn(30, 16, generator=g)
    assert knn_classify(train_f, train_y, test_f, test_y, [1, 10, 20], 0.07, 5) == {1: 1.0, 10: 1.0, 20: 1.0}
    wrong = (test_y + 1) % 5
    assert knn_classify(train_f, train_y, test_f, wrong, [10], 0.07, 5) == {10: 0.0}


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_knn_temperature_weighs_close_neighbours():
    # one very close neighbour of class 0 (cos 0.99) against two farther ones of class 1 (cos 0.9)
    c0, c1 = math.degrees(math.acos(0.99)), math.degrees(math.acos(0.9))
    train_f = torch.tensor([_unit(c0), _unit(c1), _unit(-c1), _unit(180.0)])
    train_y = torch.tensor([0, 1, 1, 0])
    test_f, test_y = torch.tensor([_unit(0.0)]), torch.tensor([0])
    assert knn_classify(train_f, train_y, test_f, test_y, [3], 0.01, 2) == {3: 1.0}  # exp(99) > 2 exp(90)
    assert knn_classify(train_f, train_y, test_f, test_y, [3], 10.0, 2) == {3: 0.0}  # near-uniform: 2 votes win
    with pytest.raises(ValueError, match="exceeds the 4 training samples"):
        knn_classify(train_f, train_y, test_f, test_y, [5], 0.07, 2)
    with pytest.raises(ValueError, match="outside"):
        knn_classify(train_f, train_y, test_f, torch.tensor([2]), [1], 0.07, 2)


# ----------------------------------------------------------------------------------------------
# Linear probe


def test_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 4, generator=g)

    def separable(n):  # labels from a linear map, with a margin so that 400 samples pin the boundary down
        x = torch.randn(3 * n, 16, generator=g)
        top2 = (x @ w).topk(2, dim=1).values
        x = x[top2[:, 0] - top2[:, 1] > 0.5][:n]
        return x, (x @ w).argmax(1)

    (x_train, y_train), (x_test, y_test) = separable(400), separable(400)
    args = dict(epochs=20, lr=0.1, weight_decay=0.0, batch_size=100, seed=0)
    acc = linear_probe(x_train, y_train, x_test, y_test, **args)
    assert acc > 0.9
    # standardisation: a huge scale and offset per feature changes nothing much
    scale, shift = torch.logspace(-3, 3, 16), torch.linspace(-100, 100, 16)
    assert linear_probe(x_train * scale + shift, y_train, x_test * scale + shift, y_test, **args) > 0.9
    assert linear_probe(x_train, y_train, x_test, y_test, **args) == acc  # deterministic given the seed
    noise_train = torch.randint(0, 2, (400,), generator=g)
    noise_test = torch.randint(0, 2, (400,), generator=g)
    chance = linear_probe(x_train, noise_train, x_test, noise_test, **args)
    assert abs(chance - 0.5) < 0.1


# ----------------------------------------------------------------------------------------------
# Features from tars


def eval_cfg(tmp_path, extra=()):
    return tiny_config(tmp_path, [f'eval.train_urls=["{tmp_path}/eval/train.tar"]',
                                  f'eval.test_urls=["{tmp_path}/eval/test.tar"]', "eval.batch_size=4",
                                  "eval.knn_k=[1, 3]", "eval.probe_epochs=3", "eval.probe_batch_size=4",
                                  *extra])


def labelled(key: str, label, seed: int, size=(40, 28)) -> dict:
    s = {"__key__": key, "png": make_image_bytes("RGB", size, "png", seed=seed)}
    if label is not None:
        s["cls"] = label
    return s


def test_eval_transform_crop_fraction_1_resizes_shorter_side_then_centre_crops():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 96, 3), dtype=np.uint8)  # shorter side already 32: crop only
    out = eval_transform(Image.fromarray(wide), 32, 1.0)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(out, torch.from_numpy(wide[:, 32:64]).permute(2, 0, 1))
    square = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = np.array(square.resize((32, 32), Image.Resampling.BICUBIC))
    assert torch.equal(eval_transform(square, 32, 1.0), torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("hw", [(50, 70), (70, 50)])
def test_eval_transform_is_dinos_resize_then_centre_crop(hw):
    # DINO: shorter side to floor(32 / 0.875) = 36, the longer side in proportion (torchvision truncates:
    # 70 * 36 / 50 = 50.4 -> 50), then the centre 32 x 32 (offsets round((36-32)/2) = 2, round((50-32)/2) = 9).
    h, w = hw
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert resize_size(32, 0.875) == 36 and resize_size(224, 0.875) == 256 and resize_size(32, 1.0) == 32
    new_w, new_h = (50, 36) if w > h else (36, 50)
    box = (9, 2, 41, 34) if w > h else (2, 9, 34, 41)  # PIL crop box: left, top, right, bottom
    expected = np.array(image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop(box))
    out = eval_transform(image, 32, 0.875)
    assert out.shape == (3, 32, 32) and torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))
    assert not torch.equal(out, eval_transform(image, 32, 1.0))  # the crop fraction changes the pixels
    with pytest.raises(ValueError, match="crop_fraction"):
        eval_transform(image, 32, 0.0)


def test_extract_eval_features_order_skips_and_values(tmp_path):
    cfg = eval_cfg(tmp_path)
    labels = [3, 1, 4, 1, 5, 9]
    samples = [labelled(f"{i:04d}", y, seed=i) for i, y in enumerate(labels[:3])]
    samples += [labelled("u1", None, 50), labelled("u2", "abc", 51),
                {"__key__": "bad", "jpg": b"not an image", "cls": 2}]
    samples += [labelled(f"{i:04d}", y, seed=i) for i, y in enumerate(labels[3:], 3)]
    write_tar(tmp_path / "eval" / "train.tar", samples)
    torch.manual_seed(0)
    model = build_student(cfg.student, 32, 8).train()
    report: dict = {}
    feats, y = extract_eval_features(model, cfg.eval.train_urls, cfg, cfg.student.mean, cfg.student.std,
                                     report=report)
    assert model.training  # the caller's mode is restored
    assert y.tolist() == labels and y.dtype == torch.int64
    assert set(feats) == {"cls", "mean_patch"}
    assert feats["cls"].shape == feats["mean_patch"].shape == (6, 32)
    assert (report["n"], report["skipped_unlabelled"], report["skipped_undecodable"]) == (6, 2, 1)
    assert any("u2" in e and "not an integer" in e for e in report["examples"])
    assert any("bad" in e for e in report["examples"])
    # sample 4 (label 5), from the second batch of 4, computed by hand with the configured DINO crop
    assert cfg.eval.crop_fraction == 0.875
    image = Image.open(io.BytesIO(samples[7]["png"])).convert("RGB")
    x = eval_transform(image, 32, 0.875).float().div(255)[None]
    x = (x - torch.tensor(cfg.student.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.student.std).view(1, 3, 1, 1)
    with torch.no_grad():
        cls, patches = forward_visible(model.eval(), x, torch.arange(16)[None])
    torch.testing.assert_close(feats["cls"][4], cls[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["mean_patch"][4], patches[0].mean(0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats["cls"][4], feats["cls"][3])
    only_cls, _ = extract_eval_features(model, cfg.eval.train_urls, cfg, cfg.student.mean, cfg.student.std, ["cls"])
    assert set(only_cls) == {"cls"} and torch.equal(only_cls["cls"], feats["cls"])


def test_extract_eval_features_workers_and_errors(tmp_path):
    cfg = eval_cfg(tmp_path, ["data.num_workers=2"])
    write_tar(tmp_path / "eval" / "a.tar", [labelled(f"a{i}", i, i) for i in range(3)])
    write_tar(tmp_path / "eval" / "b.tar", [labelled(f"b{i}", 10 + i, 10 + i) for i in range(2)])
    urls = [str(tmp_path / "eval" / "a.tar"), str(tmp_path / "eval" / "b.tar")]
    model = build_student(cfg.student, 32, 8)
    feats, y = extract_eval_features(model, urls, cfg, cfg.student.mean, cfg.student.std)
    serial_cfg = eval_cfg(tmp_path)
    ref, ref_y = extract_eval_features(model, urls, serial_cfg, cfg.student.mean, cfg.student.std)
    assert sorted(y.tolist()) == [0, 1, 2, 10, 11] and ref_y.tolist() == [0, 1, 2, 10, 11]
    order = [ref_y.tolist().index(v) for v in y.tolist()]  # workers interleave; features follow labels
    torch.testing.assert_close(feats["cls"], ref["cls"][order])
    write_tar(tmp_path / "eval" / "none.tar", [labelled("x", None, 0)])
    with pytest.raises(ValueError, match="no labelled samples"):
        extract_eval_features(model, [str(tmp_path / "eval" / "none.tar")], serial_cfg, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="expects 64x64 images"):
        big = build_student(cfg.student, 64, 8)
        extract_eval_features(big, urls, serial_cfg, [0.5] * 3, [0.5] * 3)


# ----------------------------------------------------------------------------------------------
# End to end


def write_two_class_data(tmp_path):
    def img(c, i):  # class 0: dark images, class 1: bright; seeds vary the pattern
        arr = np.random.default_rng(i).integers(0, 100, (28, 40, 3), dtype=np.uint8) + (150 if c else 0)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    train = [{"__key__": f"t{i}", "png": img(i % 2, i), "cls": i % 2} for i in range(8)]
    train.append({"__key__": "nolabel", "png": img(0, 99)})
    test = [{"__key__": f"v{i}", "png": img(i % 2, 100 + i), "cls": i % 2} for i in range(4)]
    write_tar(tmp_path / "eval" / "train.tar", train)
    write_tar(tmp_path / "eval" / "test.tar", test)


def test_evaluate_model_end_to_end(tmp_path):
    cfg = eval_cfg(tmp_path)
    write_two_class_data(tmp_path)
    model, mean, std, desc = load_eval_model(cfg, random_init_seed=0)
    result = evaluate_model(model, cfg, mean, std)
    assert desc == "random_init_0"
    for f in ("cls", "mean_patch"):
        assert set(result[f]) == {"knn@1", "knn@3", "linear"}
        assert all(0.0 <= v <= 1.0 and v * 4 == int(v * 4) for v in result[f].values())  # k of 4 test samples
    assert (result["n_train"], result["n_test"], result["skipped_unlabelled"]) == (8, 4, 1)
    protocol = result["protocol"]
    assert protocol["knn"]["k"] == [1, 3] and protocol["knn"]["temperature"] == cfg.eval.knn_temperature
    assert protocol["num_classes"] == 2 and set(protocol["features"]) == {"cls", "mean_patch"}
    t = protocol["transform"]
    assert (t["crop_fraction"], t["resize_shorter_side"], t["crop"], t["interpolation"]) == (0.875, 36, 32, "bicubic")
    assert t["mean"] == list(mean) and t["std"] == list(std)
    json.dumps(result)  # serialisable as is
    full = evaluate_model(model, eval_cfg(tmp_path, ["eval.crop_fraction=1.0"]), mean, std)
    assert full["protocol"]["transform"]["resize_shorter_side"] == 32


def test_main_eval_random_init_is_reproducible(tmp_path, capsys):
    cfg = eval_cfg(tmp_path)
    write_two_class_data(tmp_path)
    (tmp_path / "p.toml").write_text(dumps_toml(cfg))
    args = Namespace(config=str(tmp_path / "p.toml"), set=["eval.features=[\"cls\"]"], checkpoint=None, export=None,
                     teacher=None, random_init=7, out=None)
    rng = torch.get_rng_state()
    first = main_eval(args)
    assert torch.equal(torch.get_rng_state(), rng)  # the baseline's seeding does not leak
    saved = json.loads((tmp_path / "run" / "eval_random_init_7.json").read_text())
    assert saved == first and set(saved) >= {"cls", "protocol"} and "mean_patch" not in saved
    assert "knn@1" in capsys.readouterr().out
    assert main_eval(Namespace(**{**vars(args), "out": str(tmp_path / "again.json")})) == first
    with pytest.raises(ValueError, match="exactly one"):
        main_eval(Namespace(**{**vars(args), "teacher": "mae"}))


def test_load_eval_model_sources(tmp_path):
    cfg = eval_cfg(tmp_path)
    torch.manual_seed(3)
    student = build_student(cfg.student, 32, 8)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    sd = {"student." + k: v for k, v in student.state_dict().items()} | {"projector.weight": torch.zeros(2)}
    safetensors.torch.save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "meta.json").write_text("{}")
    model, mean, std, desc = load_eval_model(cfg, checkpoint=tmp_path / "run")
    assert desc == "step_00000004" and mean == cfg.student.mean and not model.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in model.state_dict().items())

    export_student(cfg, ckpt, tmp_path / "exp")
    exported, _, _, desc = load_eval_model(cfg, export=tmp_path / "exp")
    assert desc == "export_exp"
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in exported.state_dict().items())

    tc = cfg.teachers["mocov3"]
    teacher = build_vit(tc.arch, tc.arch_kwargs, 32, 8)
    (tmp_path / "ckpt").mkdir()
    save_in_official_format(teacher.state_dict(), tc.weights, "state_dict")
    loaded, mean, _, desc = load_eval_model(cfg, teacher="mocov3")
    assert desc == "teacher_mocov3" and mean == tc.mean
    assert torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"],
                       teacher.state_dict()["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="unknown teacher 'dino'"):
        load_eval_model(cfg, teacher="dino")

    a, *_ = load_eval_model(cfg, random_init_seed=5)
    b, *_ = load_eval_model(cfg, random_init_seed=5)
    c, *_ = load_eval_model(cfg, random_init_seed=6)
    key = "blocks.0.mlp.fc1.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
