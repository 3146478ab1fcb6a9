"""Export: the student alone, loadable by timm's documented pretrained path, with identical features."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from conftest import tiny_config
from distill.export import export_student, load_export, main_export, resolve_checkpoint_dir
from distill.student import build_student
from store_schema.config import dumps_toml

EXTRA_KEYS = ("projector.weight", "projector.bias", "decoder.mask_token", "decoder.blocks.0.attn.qkv.weight",
              "adapters.mae.weight")


def trained_like_student(cfg, seed: int = 0):
    """A student whose every trainable weight is random (not timm's init), so a wrong load shows."""
    torch.manual_seed(seed)
    model = build_student(cfg.student, cfg.data.image_size, cfg.data.patch_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    return model.eval()


def fabricate_checkpoint(run_dir: Path, model, step: int, *, complete: bool = True, drop: str | None = None) -> Path:
    """run_dir/checkpoints/step_XXXXXXXX/ as the trainer writes it: distiller state + meta.json last."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    sd = {"student." + k: v.clone() for k, v in model.state_dict().items() if k != drop}
    sd.update({k: torch.randn(4, 4) for k in EXTRA_KEYS})
    safetensors.torch.save_file(sd, str(ckpt / "model.safetensors"))
    if complete:
        (ckpt / "meta.json").write_text(json.dumps({"step": step}))
    return ckpt


def test_export_loads_in_timm_with_identical_features(tmp_path):
    cfg = tiny_config(tmp_path)
    student = trained_like_student(cfg)
    ckpt = fabricate_checkpoint(tmp_path / "run", student, 20)
    out = export_student(cfg, ckpt, tmp_path / "export")

    exported = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert set(exported) == set(student.state_dict())  # nothing of the projector/decoder/adapters
    assert not any(k.startswith(("projector", "decoder", "adapters", "student.")) for k in exported)
    assert torch.equal(exported["pos_embed"], student.pos_embed.detach())  # the fixed sin-cos table, as is

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == cfg.student.arch and config["num_classes"] == 0
    assert config["model_args"] == {"img_size": 32, "patch_size": 8, **cfg.student.arch_kwargs}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["crop_pct"] == cfg.eval.crop_fraction  # the eval protocol travels with it
    assert config["pretrained_cfg"]["mean"] == cfg.student.mean and config["pretrained_cfg"]["std"] == cfg.student.std

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = student.forward_features(x)
        # the call the brief documents, exactly
        brief = timm.create_model(cfg.student.arch, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                                  img_size=32, patch_size=8, **cfg.student.arch_kwargs).eval()
        assert torch.equal(brief.forward_features(x), reference)
        documented, _ = load_export(out)  # the same plus num_classes=0 in the overlay (strict load)
        assert torch.equal(documented.forward_features(x), reference)
        from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert from_dir.num_classes == 0 and from_dir.pretrained_cfg["input_size"] == (3, 32, 32)
        assert torch.equal(from_dir.forward_features(x), reference)
    for k, v in documented.state_dict().items():  # every tensor came from the file, none from timm's init
        assert torch.equal(v, student.state_dict()[k]), k


def test_documented_load_is_strict(tmp_path):
    # Why the overlay carries num_classes=0: without it timm loads non-strictly (1000 != 0 classes).
    cfg = tiny_config(tmp_path)
    out = export_student(cfg, fabricate_checkpoint(tmp_path / "run", trained_like_student(cfg), 1), tmp_path / "e")
    sd = safetensors.torch.load_file(str(out / "model.safetensors"))
    del sd["blocks.0.attn.qkv.weight"]
    safetensors.torch.save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        load_export(out)


def test_run_dir_resolves_to_latest_complete_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    fabricate_checkpoint(run, trained_like_student(cfg, seed=1), 10)
    newest = trained_like_student(cfg, seed=2)
    fabricate_checkpoint(run, newest, 20)
    fabricate_checkpoint(run, trained_like_student(cfg, seed=3), 30, complete=False)  # interrupted save
    assert resolve_checkpoint_dir(run).name == "step_00000020"
    model, _ = load_export(export_student(cfg, run, tmp_path / "export"))
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], newest.state_dict()["blocks.0.mlp.fc1.weight"])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_checkpoint_dir(run / "checkpoints" / "step_00000030")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint_dir(tmp_path / "nowhere")


def test_missing_student_key_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path)
    ckpt = fabricate_checkpoint(tmp_path / "run", trained_like_student(cfg), 5, drop="blocks.0.norm1.weight")
    with pytest.raises(ValueError, match=r"missing keys: \['blocks.0.norm1.weight'\]"):
        export_student(cfg, ckpt, tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_checkpoint_without_student_or_of_another_student(tmp_path):
    cfg = tiny_config(tmp_path)
    ckpt = tmp_path / "other" / "step_00000001"
    ckpt.mkdir(parents=True)
    safetensors.torch.save_file({"projector.weight": torch.zeros(2, 2)}, str(ckpt / "model.safetensors"))
    (ckpt / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'student.\\*' keys"):
        export_student(cfg, ckpt, tmp_path / "export")
    # a run whose config.toml trained a wider student: named, with the fix
    wide = tiny_config(tmp_path, ["student.arch_kwargs={embed_dim = 48, depth = 1, num_heads = 2}"])
    ckpt = fabricate_checkpoint(tmp_path / "run", trained_like_student(wide), 1)
    (tmp_path / "run" / "config.toml").write_text(dumps_toml(wide))
    with pytest.raises(ValueError, match="pass --config"):
        export_student(cfg, ckpt, tmp_path / "export")


def test_main_export(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    (tmp_path / "pipeline.toml").write_text(dumps_toml(cfg))
    student = trained_like_student(cfg)
    fabricate_checkpoint(tmp_path / "run", student, 3)
    args = Namespace(config=str(tmp_path / "pipeline.toml"), set=["eval.batch_size=2"],
                     checkpoint=str(tmp_path / "run"), out=str(tmp_path / "exp"))
    out = main_export(args)
    assert "step_00000003" in capsys.readouterr().out
    model, _ = load_export(out)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), student.forward_features(x))


def test_export_is_a_timm_hub_directory_with_the_trained_data_config(tmp_path, monkeypatch):
    # trained at 32 px with non-default normalisation and crop: what timm must report, not its 224 / 0.5 defaults
    cfg = tiny_config(tmp_path, ["student.mean=[0.31, 0.32, 0.33]", "student.std=[0.35, 0.36, 0.37]",
                                 "eval.crop_fraction=0.9"])
    student = trained_like_student(cfg)
    out = export_student(cfg, fabricate_checkpoint(tmp_path / "run", student, 7), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    expected = {"input_size": (3, 32, 32), "mean": (0.31, 0.32, 0.33), "std": (0.35, 0.36, 0.37),
                "crop_pct": 0.9, "interpolation": "bicubic", "crop_mode": "center"}

    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_cfg = timm.data.resolve_data_config(model=local)
    as_read = lambda d: {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in expected}  # noqa: E731 (JSON lists)
    assert as_read(data_cfg) == expected
    assert timm.data.resolve_model_data_config(local)["input_size"] == (3, 32, 32)

    # The Hub path reads the same files: serve the export as a Hub repo (no network) and load it by hf-hub:
    import timm.models._hub as hub
    served = []

    def from_export(repo_id, filename, **kwargs):
        served.append((repo_id, filename))
        return str(out / filename)
    monkeypatch.setattr(hub, "hf_hub_download", from_export)
    remote = timm.create_model("hf-hub:someone/comad-student", pretrained=True).eval()
    assert as_read(timm.data.resolve_data_config(model=remote)) == expected
    assert (("someone/comad-student", "config.json") in served
            and ("someone/comad-student", "model.safetensors") in served)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = student.forward_features(x)
        assert torch.equal(local.forward_features(x), reference) and torch.equal(remote.forward_features(x), reference)

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card  # the Hub's model card front matter
    assert 'timm.create_model("hf-hub:<user>/<repo>", pretrained=True)' in card
    assert "timm.data.resolve_data_config(model=model)" in card and "32 x 32" in card


def test_main_export_prints_the_load_lines(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    (tmp_path / "pipeline.toml").write_text(dumps_toml(cfg))
    fabricate_checkpoint(tmp_path / "run", trained_like_student(cfg), 3)
    out = main_export(Namespace(config=str(tmp_path / "pipeline.toml"), set=[], checkpoint=str(tmp_path / "run"),
                                out=str(tmp_path / "exp")))
    printed = capsys.readouterr().out
    line = f'model = timm.create_model("local-dir:{out.resolve()}", pretrained=True).eval()'
    assert line in printed
    namespace: dict = {}
    exec(line, {"timm": timm}, namespace)  # the printed line, run as printed
    assert namespace["model"].pretrained_cfg["input_size"] == (3, 32, 32)


def test_eval_of_an_export_reads_its_run_config(tmp_path, capsys):
    from test_evaluate import eval_cfg, write_two_class_data
    from distill.evaluate import main_eval

    cfg = eval_cfg(tmp_path, ['eval.features=["cls"]'])
    write_two_class_data(tmp_path)
    fabricate_checkpoint(tmp_path / "run", trained_like_student(cfg), 2)
    (tmp_path / "run" / "config.toml").write_text(dumps_toml(cfg))  # as the trainer leaves it
    export_student(cfg, tmp_path / "run", tmp_path / "exp")
    args = Namespace(config=None, set=[], checkpoint=None, export=str(tmp_path / "exp"), teacher=None,
                     random_init=None, out=str(tmp_path / "e.json"))
    result = main_eval(args)  # no --config: the export's source run supplies it
    assert result["model"] == "export_exp" and 0 <= result["cls"]["linear"] <= 1
    (tmp_path / "run" / "config.toml").unlink()
    with pytest.raises(ValueError, match="--config is required with --teacher / --random-init, and with an --export"):
        main_eval(args)
