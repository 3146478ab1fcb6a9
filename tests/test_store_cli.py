"""comad-store inspect / validate: the numbers, a clean store, and every kind of damage named."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from store_schema.cli import main
from store_schema.codec import compressors_for
from store_schema.store import FeatureStore, unit_name
from store_schema.inspection import inspect_store
from store_schema.validate import validate_store
from store_schema.writer import UnitWriter
from store_fixtures import make_rows, teacher_meta, write_unit
from conftest import REPO, tiny_config

# 11 rows: one whole shard of 8 and a partial one of 3; chunks of 4 rows per view.
N_A, N_B = 11, 6


def _build(tmp: Path, extra: list[str] = ()) -> tuple[str, dict]:
    cfg = tiny_config(tmp, list(extra))
    store = FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))
    rows = {"a": write_unit(store, cfg, "data/a.tar", N_A, seed=1),
            "b": write_unit(store, cfg, "data/b.tar", N_B, seed=2)}
    store.finalize_stats()
    return cfg.store.root, rows


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, str]:
    """One clean store per compression, built once; tests damage copies of it."""
    out = {}
    for comp in ("zstd", "none"):
        out[comp] = _build(tmp_path_factory.mktemp(comp), [f'store.compression="{comp}"'])[0]
    return out


@pytest.fixture
def copy_of(pristine, tmp_path):
    def make(comp: str = "zstd") -> str:
        dst = tmp_path / f"store-{comp}"
        shutil.copytree(pristine[comp], dst)
        return str(dst)
    return make


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


def _shard_file(root: str, unit_src: str, array: str, shard: int = 0) -> Path:
    base = Path(root) / "units" / unit_name(unit_src) / array / "c" / str(shard)
    files = [p for p in base.rglob("*") if p.is_file()] if base.is_dir() else [base]
    (f,) = files
    return f


def _first_chunk_range(path: Path, inner: int) -> tuple[int, int]:
    """(offset, length) of the first inner chunk, from the shard index at the file's end (Zarr v3 spec)."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-4 - 16 * inner:-4], "<u8").reshape(inner, 2)
    return int(index[0, 0]), int(index[0, 1])


# ---------------------------------------------------------------------------------------------- numbers

def test_inspect_reports_the_numbers(tmp_path):
    root, rows = _build(tmp_path)
    store = FeatureStore.open(root, mode="r+")
    w = UnitWriter(store, "data/c.tar")  # an incomplete unit: not counted
    w.append(make_rows(tiny_config(tmp_path), ["c-0"], np.random.default_rng(0)))
    w2 = UnitWriter(store, "data/d.tar")
    w2.append(make_rows(tiny_config(tmp_path), ["d-0", "d-1"], np.random.default_rng(0)))
    w2.skip(2, "d-2", "cannot decode image: truncated JPEG")
    w2.commit()
    info = inspect_store(root)
    assert info["samples"] == info["rows"] == N_A + N_B + 2 and info["views"] == 2
    assert info["units"]["complete"] == 3 and info["units"]["incomplete"] == 1
    assert info["teachers"]["ibot"]["dim"] == 32
    assert [info["teachers"][t]["tokens"] for t in ("mae", "mocov3", "ibot")] == [6, 9, 11]
    # decoded bytes are the arithmetic of the layout: per (sample, view): student idx + pixels + views,
    # each teacher idx + float16 patch + cls; per sample: index + label
    per_view = 4 * 4 + 4 * 3 * 8 * 8 + 5 * 4 + sum(k * 4 + k * 32 * 2 + 32 * 2 for k in (6, 9, 11))
    assert info["decoded_bytes"] == info["rows"] * (2 * per_view + 16)
    unit_dirs = [Path(root) / "units" / unit_name(f"data/{u}.tar") for u in ("a", "b", "d")]
    on_disk = sum(p.stat().st_size for d in unit_dirs for p in d.rglob("c/**/*")
                  if p.is_file() and "stats_" not in str(p))
    assert info["stored_bytes"] == on_disk > 0
    assert info["stored_fraction"] == pytest.approx(on_disk / info["decoded_bytes"]) and info["stored_fraction"] > 0
    assert info["bytes_per_view"] == pytest.approx(on_disk / (info["rows"] * 2))
    assert sum(info["bytes_per_view_by_part"].values()) == pytest.approx(info["bytes_per_view"])
    assert info["skipped"] == [{"unit": unit_name("data/d.tar"), "source": "data/d.tar", "index": 2, "key": "d-2",
                                "reason": "cannot decode image: truncated JPEG"}]
    assert info["stats_finalised"] == {"mae": "stale", "mocov3": "stale", "ibot": "stale"}  # finalised before d
    store.finalize_stats()
    assert set(inspect_store(root)["stats_finalised"].values()) == {"current"}


def test_console_script_and_module_on_a_clean_store(pristine):
    root = pristine["zstd"]
    exe = shutil.which("comad-store") or pytest.skip("comad-store is not installed (pip install -e .)")
    r = subprocess.run([exe, "inspect", root], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"samples\s+{N_A + N_B} usable", r.stdout) and "ibot" in r.stdout
    r = subprocess.run([exe, "inspect", root, "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout)["samples"] == N_A + N_B
    r = subprocess.run([exe, "validate", root], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok (2 complete units, 17 rows" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "store_schema", "validate", root, "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] and report["problems"] == []
    assert report["checked"]["units"] == 2 and report["checked"]["arrays"] == 2 * (5 + 3 * 3)


def test_a_store_that_cannot_be_opened_exits_2(tmp_path, capsys):
    code, text = _run_cli(["validate", str(tmp_path / "nothing-here")], capsys)
    assert code == 2 and "cannot open" in text
    zarr.open_group(str(tmp_path / "foreign"), mode="w")
    code, text = _run_cli(["inspect", str(tmp_path / "foreign")], capsys)
    assert code == 2 and "not a CoMAD store" in text
    r = subprocess.run([sys.executable, "-m", "store_schema", "validate", str(tmp_path / "nothing-here"), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "error" in json.loads(r.stdout) and "Traceback" not in r.stderr


def test_the_layout_document_example_reads_a_store(pristine):
    """The 10-line reader in store_schema/README.md runs as written and returns the stored data."""
    doc = (REPO / "store_schema" / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    env: dict = {}
    exec(code.replace('"stores/comad-in1k"', repr(pristine["zstd"])), env)
    store = FeatureStore.open(pristine["zstd"])
    last = store.units()[-1].name
    block = store.read_block(last, 0, store.unit_info(last).n_samples, 0)["teachers"][store.teachers[0]]
    np.testing.assert_array_equal(env["idx"], block["idx"])
    np.testing.assert_array_equal(env["patch"], block["patch"])


# ---------------------------------------------------------------------------------------------- damage

def _damage_delete_shard(root):
    _shard_file(root, "data/a.tar", "teachers/mae/patch", shard=1).unlink()
    return "units/{a}/teachers/mae/patch", "missing shard file"


def _damage_truncate_shard(root):
    f = _shard_file(root, "data/a.tar", "teachers/mocov3/cls")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "units/{a}/teachers/mocov3/cls", "cannot be read"


def _damage_empty_shard(root):
    _shard_file(root, "data/b.tar", "student_pixels").write_bytes(b"")
    return "units/{b}/student_pixels", "truncated shard file"


def _damage_flip_shard_index(root):
    f = _shard_file(root, "data/a.tar", "label")
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # inside the (offset, length) table, which carries a CRC32C
    f.write_bytes(bytes(raw))
    return "units/{a}/label", "cannot be read"


def _damage_flip_compressed_idx(root):
    f = _shard_file(root, "data/a.tar", "teachers/ibot/idx")
    off, length = _first_chunk_range(f, inner=2 * 2)
    raw = bytearray(f.read_bytes())
    raw[off + length // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    return "units/{a}/teachers/ibot/idx", "cannot be read"  # the CRC32C at the end of every chain catches it


def _damage_wrong_schema_version(root):
    g = zarr.open_group(root, mode="r+")
    meta = dict(g.attrs)["comad"]
    meta["schema_version"] = "2.0"
    g.attrs.put({"comad": meta})
    return "<root>", "schema version 2.0 is not readable"


def _damage_missing_teacher_array(root):
    shutil.rmtree(Path(root) / "units" / unit_name("data/b.tar") / "teachers" / "mocov3" / "cls")
    return "units/{b}/teachers/mocov3/cls", "array missing"


def _damage_incomplete_unit(root):
    g = zarr.open_group(f"{root}/units/{unit_name('data/b.tar')}/teachers/ibot", mode="r+")
    g.attrs.put({"comad_teacher": {"status": "writing"}})
    return "units/{b}", "incomplete unit: source data/b.tar: unit record status 'complete', teachers not complete: ibot"


def _damage_duplicate_keys(root):
    g = zarr.open_group(f"{root}/units/{unit_name('data/b.tar')}", mode="r+")
    rec = dict(g.attrs)["comad_unit"]
    rec["keys"][3] = "a.tar-00007"
    g.attrs.put({"comad_unit": rec})
    # units are checked in name order; the later one is reported, naming the earlier
    if unit_name("data/a.tar") < unit_name("data/b.tar"):
        return "units/{b}", "duplicate key: 'a.tar-00007' (row 3) is also row 7 of units/{a}"
    return "units/{a}", "duplicate key: 'a.tar-00007' (row 7) is also row 3 of units/{b}"


def _damage_out_of_range_index(root):
    zarr.open_array(f"{root}/units/{unit_name('data/a.tar')}/student_idx", mode="r+")[9, 1, 3] = 16
    return "units/{a}/student_idx", "token index out of range [0, 16): first at row 9"


def _damage_student_not_in_teacher(root):
    a = zarr.open_array(f"{root}/units/{unit_name('data/a.tar')}/teachers/mae/idx", mode="r+")
    s = zarr.open_array(f"{root}/units/{unit_name('data/a.tar')}/student_idx", mode="r")[5, 0]
    a[5, 0] = np.setdiff1d(np.arange(16), s)[:6]  # sorted, in range, but without the student's tokens
    return "units/{a}/teachers/mae/idx", "does not contain every student-visible index: first at row 5"


def _damage_unit_stats(root):
    arr = zarr.open_array(f"{root}/units/{unit_name('data/a.tar')}/teachers/ibot/stats_mean", mode="r+")
    arr[:] = arr[:] + 5.0
    return "units/{a}/teachers/ibot", "statistics disagree with the stored features"


def _damage_final_stats(root):
    arr = zarr.open_array(f"{root}/stats/mae/cov", mode="r+")
    arr[0, 0] = arr[0, 0] * 2
    return "stats/mae", "finalised statistics are not the merge of the units'"


def _damage_stale_final_stats(root):
    shutil.rmtree(Path(root) / "units" / unit_name("data/b.tar"))
    return "stats/ibot", "finalised statistics are stale: they cover 2 units, the store has 1"


def _damage_root_tokens(root):
    g = zarr.open_group(root, mode="r+")
    meta = dict(g.attrs)["comad"]
    meta["teachers"]["mae"]["tokens"] = 7
    g.attrs.put({"comad": meta})
    return ("units/{a}/teachers/mae/idx",
            "wrong shape or dtype: found ((11, 2, 6), 'int32'), expected ((11, 2, 7), 'int32')")


def _damage_final_stats_missing(root):
    shutil.rmtree(Path(root) / "stats" / "mocov3")
    return "stats/mocov3", "finalised statistics missing"


DAMAGE = [_damage_final_stats_missing, _damage_delete_shard, _damage_truncate_shard, _damage_empty_shard,
          _damage_flip_shard_index,
          _damage_flip_compressed_idx, _damage_wrong_schema_version, _damage_missing_teacher_array,
          _damage_incomplete_unit, _damage_duplicate_keys, _damage_out_of_range_index,
          _damage_student_not_in_teacher, _damage_unit_stats, _damage_final_stats, _damage_stale_final_stats,
          _damage_root_tokens]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__[len("_damage_"):])
def test_validate_names_each_kind_of_damage(copy_of, capsys, damage):
    root = copy_of("zstd")
    where, what = damage(root)
    names = {"a": unit_name("data/a.tar"), "b": unit_name("data/b.tar")}
    where, what = where.format(**names), what.format(**names)
    code, text = _run_cli(["validate", root], capsys)
    assert code == 1, text
    assert f"{where}: {what}" in text, text


@pytest.mark.parametrize("dtype, comp", [("int8", "blosc"), ("float32", "none")])
def test_every_dtype_validates_clean_and_int8_scales_are_checked(tmp_path, dtype, comp):
    root, _ = _build(tmp_path, [f'store.dtype="{dtype}"', f'store.compression="{comp}"'])
    assert validate_store(root) == []
    if dtype == "int8":
        zarr.open_array(f"{root}/units/{unit_name('data/b.tar')}/teachers/mae/cls_scale", mode="r+")[4, 1] = -1.0
        assert [str(p) for p in validate_store(root)] == [
            f"units/{unit_name('data/b.tar')}/teachers/mae/cls_scale: scale not finite or negative: first at row 4, "
            "1 entries in rows 4-6"]


def test_a_missing_shard_is_found_even_though_zarr_reads_it_as_fill_values(copy_of):
    root = copy_of("zstd")
    _shard_file(root, "data/a.tar", "label", shard=1).unlink()
    labels = zarr.open_array(f"{root}/units/{unit_name('data/a.tar')}/label", mode="r")[8:]
    assert (labels == -1).all()  # what a naive reader gets: plausible "no class" labels
    (p,) = validate_store(root)
    assert p.where.endswith("/label") and p.what.startswith("missing shard file") and "rows 8-11" in p.what


def test_excluded_duplicate_rows_are_not_a_problem(copy_of):
    root = copy_of("zstd")
    _damage_duplicate_keys(root)
    assert [p.what.split(":")[0] for p in validate_store(root)] == ["duplicate key"]
    FeatureStore.open(root, mode="r+").exclude_rows(unit_name("data/b.tar"), [3], ["key already stored"])
    assert validate_store(root) == []


def test_uncompressed_features_overwritten_are_caught_by_the_checksum(copy_of):
    root = copy_of("none")
    f = _shard_file(root, "data/a.tar", "teachers/ibot/patch")
    off, length = _first_chunk_range(f, inner=2 * 2)
    raw = bytearray(f.read_bytes())
    raw[off:off + 8] = b"\xff" * 8  # float16 0xFFFF is NaN
    f.write_bytes(bytes(raw))
    problems = [str(p) for p in validate_store(root)]
    assert any("teachers/ibot/patch: cannot be read" in p and "checksum" in p for p in problems), problems


@pytest.mark.parametrize("comp", ["zstd", "none"])
def test_a_single_bit_flip_in_pixels_is_only_found_with_chunk_checksums(copy_of, comp):
    """What validation cannot see, stated as a test: uint8 pixels have no invalid value, and zarr's zstd
    runs without a checksum, so a flipped bit in a pixel chunk reads back as other pixels. It is found
    because every compressor chain ends in a CRC32C codec (store_schema/codec.py)."""
    root = copy_of(comp)
    f = _shard_file(root, "data/a.tar", "student_pixels")
    off, length = _first_chunk_range(f, inner=2 * 2)
    raw = bytearray(f.read_bytes())
    raw[off + length // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    assert type(compressors_for(comp, 3)[-1]).__name__ == "Crc32cCodec"
    problems = validate_store(root)
    assert problems and any("student_pixels" in p.where for p in problems), problems


def test_validation_reads_one_block_of_chunk_samples_at_a_time(copy_of, monkeypatch):
    root = copy_of("zstd")
    rows_per_read = []
    orig = zarr.Array.__getitem__

    def spy(self, sel):
        if "stats" not in self.path and isinstance(sel, slice):  # statistics are (D,) / (D, D), read whole
            rows_per_read.append(len(range(*sel.indices(self.shape[0]))))
        return orig(self, sel)

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    assert validate_store(root) == []
    blocks = -(-N_A // 4) + -(-N_B // 4)  # chunk_samples = 4 in the tiny config
    assert len(rows_per_read) == blocks * (5 + 3 * 3) and max(rows_per_read) <= 4  # each array read once per block
