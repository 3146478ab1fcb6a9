"""The arrays of one store unit, defined once: the writer creates them, the reader reads them, validate
and inspect check and count them from this table (store_schema/README.md, "Per-unit arrays", is its prose).

Every array's first axis is the row (sample) axis; per-view arrays have the view axis next. Shapes after
those axes are written with the symbols of the store's root record: "Ks" student tokens, "p" patch size,
"Kt" and "D" a teacher's tokens and feature width. `dtype` "features" is the store's feature dtype
(store.dtype); arrays marked `int8_only` exist only in an int8 store (the per-token scales, named
"<feature array>_scale").

`part` groups arrays by what a reader may leave out: "meta" (view boxes, tar ordinals, labels: the
trainer uses none), "pixels", "cls" (the teachers' CLS: read only with a CLS term); "core" is always read.

Adding an array: one line here and its data in the writer's rows (store_schema/writer.py: UnitRows or
TeacherRows, a field of the same name; tests/test_layout.py checks they agree); the writer, read_block,
validate and inspect follow from the table (a feature array is encoded and decoded like `patch`). Its
content checks beyond shape and dtype, if any, go in validate. Stores written before the line was added
lack the array, and every reader here requires each array of the table: store_schema/README.md ("Schema
version") lets a MINOR bump add arrays older readers ignore, but these readers do not yet tolerate one
missing, so until they do (a schema-version field per entry) a new array means a MAJOR bump.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VIEW_PARAMS = 5  # top, left, height, width (normalised to the source image), flip
FEATURES = "features"  # dtype placeholder: the store's feature dtype


@dataclass(frozen=True)
class ArraySpec:
    name: str  # path inside the unit (base arrays) or inside teachers/<t>/ (teacher arrays)
    row: tuple[str | int, ...]  # shape after the row (and view) axes, symbols resolved from the root record
    dtype: str  # numpy dtype name, or FEATURES
    per_view: bool = True
    part: str = "core"  # core | meta | pixels | cls
    int8_only: bool = False


BASE_ARRAYS = (
    ArraySpec("index", (), "int64", per_view=False, part="meta"),  # ordinal of the sample in its tar
    ArraySpec("label", (), "int64", per_view=False, part="meta"),  # -1 where the sample has no `cls`
    ArraySpec("views", (VIEW_PARAMS,), "float32", part="meta"),
    ArraySpec("student_idx", ("Ks",), "int32"),  # the student's visible tokens, sorted
    ArraySpec("student_pixels", ("Ks", 3, "p", "p"), "uint8", part="pixels"),
)
TEACHER_ARRAYS = (
    ArraySpec("idx", ("Kt",), "int32"),  # the teacher's visible tokens, sorted
    ArraySpec("patch", ("Kt", "D"), FEATURES),
    ArraySpec("cls", ("D",), FEATURES, part="cls"),
    ArraySpec("patch_scale", ("Kt",), "float32", int8_only=True),
    ArraySpec("cls_scale", (), "float32", part="cls", int8_only=True),
)
TEACHER_SPECS = {spec.name: spec for spec in TEACHER_ARRAYS}
PARTS = ("core", "meta", "pixels", "cls")
# FeatureStore.read_block's key for a base array, where it is not the array's name (the trainer's batch word).
READ_KEYS = {"student_pixels": "pixels"}


@dataclass(frozen=True)
class UnitArray:
    """One array of a unit, resolved for a store: `path` relative to the unit group."""
    path: str
    spec: ArraySpec
    row_shape: tuple[int, ...]
    dtype: str
    teacher: str | None

    @property
    def per_view(self) -> bool:
        return self.spec.per_view


def unit_arrays(meta: dict[str, Any], teachers: list[str] | None = None, base: bool = True,
                parts: tuple[str, ...] = PARTS) -> list[UnitArray]:
    """The arrays of one unit of the store whose root record is `meta`, base arrays first (unless `base` is
    False), then each teacher's (`teachers`: these only, an empty list none, None all of
    meta["teacher_order"]); only those in `parts`."""
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"unknown array part {p!r}; choose from {', '.join(PARTS)}")
    int8 = meta["dtype"] == "int8"
    sizes = {"Ks": int(meta["student_tokens"]), "p": int(meta["patch_size"])}
    out = []
    if base:
        out += [_resolve(s, s.name, sizes, meta["dtype"], None) for s in BASE_ARRAYS if s.part in parts]
    for t in meta["teacher_order"] if teachers is None else teachers:
        tm = meta["teachers"][t]
        tsizes = {**sizes, "Kt": int(tm["tokens"]), "D": int(tm["dim"])}
        out += [_resolve(s, f"teachers/{t}/{s.name}", tsizes, meta["dtype"], t)
                for s in TEACHER_ARRAYS if s.part in parts and (int8 or not s.int8_only)]
    return out


def _resolve(spec: ArraySpec, path: str, sizes: dict[str, int], feature_dtype: str, teacher: str | None) -> UnitArray:
    row = tuple(sizes[d] if isinstance(d, str) else d for d in spec.row)
    return UnitArray(path, spec, row, feature_dtype if spec.dtype == FEATURES else spec.dtype, teacher)
