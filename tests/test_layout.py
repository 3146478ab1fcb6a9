"""store_schema.layout is the one table of a unit's arrays: the writer creates exactly its arrays, the reader
returns exactly its parts, and the writer's row types carry a field per table entry."""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import zarr

from store_schema.layout import BASE_ARRAYS, TEACHER_ARRAYS, unit_arrays
from store_schema.store import FeatureStore, unit_name
from store_schema.writer import TeacherRows, UnitRows
from store_fixtures import teacher_meta, write_unit
from conftest import tiny_config


def _arrays_on_disk(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    out = {}
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            out.update(_arrays_on_disk(member, path + "/"))
        elif not name.startswith("stats_"):  # per-teacher statistics: one row each, not row data
            out[path] = member
    return out


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_written_unit_holds_exactly_the_table_arrays(tmp_path, dtype):
    cfg = tiny_config(tmp_path, [f'store.dtype="{dtype}"'])
    store = FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))
    write_unit(store, cfg, "a.tar", n=11)
    on_disk = _arrays_on_disk(store.group[f"units/{unit_name('a.tar')}"])
    table = {a.path: a for a in unit_arrays(store.meta)}
    assert set(on_disk) == set(table)
    V = cfg.views.num_views
    for path, a in table.items():
        lead = (11, V) if a.per_view else (11,)
        assert on_disk[path].shape == lead + a.row_shape, path
        assert on_disk[path].dtype == np.dtype(a.dtype), path
    scales = {p for p in table if p.endswith("_scale")}
    assert bool(scales) == (dtype == "int8")


def test_writer_rows_have_a_field_per_table_array():
    unit_fields = {f.name for f in fields(UnitRows)} - {"keys", "teachers"}
    assert unit_fields == {s.name for s in BASE_ARRAYS}
    assert {f.name for f in fields(TeacherRows)} == {s.name for s in TEACHER_ARRAYS if not s.int8_only}


def test_read_block_returns_the_parts_asked_for(tiny_cfg):
    store = FeatureStore.create(tiny_cfg.store.root, tiny_cfg, teacher_meta(tiny_cfg))
    write_unit(store, tiny_cfg, "a.tar", n=6)
    u = unit_name("a.tar")
    core = store.read_block(u, 0, 6, 0, meta=False, pixels=False, cls=False)
    assert set(core) == {"student_idx", "teachers"}
    assert set(core["teachers"]["mae"]) == {"idx", "patch"}
    full = store.read_block(u, 0, 6, 0)
    assert set(full) == {"student_idx", "teachers", "pixels", "views", "index", "label"}
    assert set(full["teachers"]["mae"]) == {"idx", "patch", "cls"}


def test_unknown_part_is_named():
    meta = {"dtype": "float16", "student_tokens": 4, "patch_size": 2, "teacher_order": [], "teachers": {}}
    with pytest.raises(ValueError, match="unknown array part 'labels'"):
        unit_arrays(meta, parts=("core", "labels"))


def test_a_torn_array_the_read_leaves_out_is_still_refused(tiny_cfg):
    """missing_shards opens every array of the table, so a torn zarr.json fails a trainer's read (meta=False)."""
    from pathlib import Path

    from store_schema.store import StoreError
    store = FeatureStore.create(tiny_cfg.store.root, tiny_cfg, teacher_meta(tiny_cfg))
    write_unit(store, tiny_cfg, "a.tar", n=6)
    u = unit_name("a.tar")
    Path(tiny_cfg.store.root, f"units/{u}/views/zarr.json").write_bytes(b"")
    with pytest.raises(StoreError, match=u):
        FeatureStore.open(tiny_cfg.store.root).read_block(u, 0, 6, 0, meta=False, cls=False)
