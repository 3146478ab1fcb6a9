"""Constraints between keys that depend on the architecture fail at load, naming the keys and valid values."""
from __future__ import annotations

import pytest

from conftest import PIPELINE_TOML, tiny_config
from distill.cli import main as distill_main
from store_schema.config import ConfigError, load_config


def _error(tmp_path, extra: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, extra)
    return str(e.value)


def test_decoder_heads_must_divide_the_student_width(tmp_path):
    msg = _error(tmp_path, ["heads.decoder_heads=3"])  # the tiny student is 32 wide
    assert "heads.decoder_heads = 3 does not divide the student width 32" in msg
    assert "valid values: 1, 2, 4, 8, 16, 32" in msg and "student.arch_kwargs" in msg
    assert tiny_config(tmp_path, ["heads.decoder_heads=4"]).heads.decoder_heads == 4


def test_the_shipped_student_width_is_read_from_timm(tmp_path):
    # vit_tiny is 192 wide: 3 divides it, 5 does not (no embed_dim in arch_kwargs to read it from)
    assert load_config(PIPELINE_TOML).heads.decoder_heads == 3
    with pytest.raises(ConfigError, match=r"decoder_heads = 5 does not divide the student width 192.*valid values: "
                                          r"1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192"):
        load_config(PIPELINE_TOML, ["heads.decoder_heads=5"])


@pytest.mark.parametrize("kwargs, needle", [
    ("{embed_dim = 30, depth = 1, num_heads = 4}", "student.arch_kwargs = {'embed_dim': 30"),
    ("{embed_dim = 32, depth = 1, num_heads = 2, foo = 1}", "unexpected keyword argument 'foo'"),
    ("{embed_dim = 32, depth = 1, num_heads = 2, img_size = 64}", "student.arch_kwargs sets ['img_size']"),
    ("{embed_dim = 32, depth = 1, num_heads = 2, reg_tokens = 4}", "4 register tokens; build it with reg_tokens=0"),
    ("{embed_dim = 30, depth = 1, num_heads = 2}", "need a multiple of 4; set embed_dim to e.g. 28 or 32"),
])
def test_an_unusable_student_is_named_at_load(tmp_path, kwargs, needle):
    msg = _error(tmp_path, [f"student.arch_kwargs={kwargs}", "heads.decoder_heads=1"])
    assert needle in msg and "student.arch" in msg


def test_an_unbuildable_teacher_is_named_at_load(tmp_path):
    msg = _error(tmp_path, ["teachers.ibot.arch_kwargs={embed_dim = 30, depth = 1, num_heads = 4}"])
    assert "teachers.ibot.arch = 'vit_base_patch16_224' with teachers.ibot.arch_kwargs" in msg
    assert "data.patch_size = 8" in msg and "teachers.mae" not in msg
    msg = _error(tmp_path, ['teachers.mae.arch="vit_nonexistent"'])
    assert "teachers.mae.arch = 'vit_nonexistent'" in msg and "Unknown model" in msg


def test_a_timm_tag_must_belong_to_its_arch():
    assert load_config(PIPELINE_TOML).teachers["mae"].weights == "vit_base_patch16_224.mae"
    with pytest.raises(ConfigError, match=r"teachers.mae.weights = 'vit_large_patch16_224.mae' is not a tag of "
                                          r"teachers.mae.arch = 'vit_base_patch16_224'; valid tags: .*"
                                          r"vit_base_patch16_224.mae"):
        load_config(PIPELINE_TOML, ['teachers.mae.weights="vit_large_patch16_224.mae"'])
    with pytest.raises(ConfigError, match=r"timm has no pretrained tag 'vit_base_patch16_224.nope'.*format"):
        load_config(PIPELINE_TOML, ['teachers.mae.weights="nope"'])


def test_every_command_refuses_before_work(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    code = distill_main(["train", "--config", str(PIPELINE_TOML), "--set", f'train.run_dir="{cfg.train.run_dir}"',
                         "--set", "heads.decoder_heads=7"])
    err = capsys.readouterr().err
    assert code == 2 and "heads.decoder_heads = 7 does not divide the student width 192" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
