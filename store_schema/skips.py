"""Why an input was not stored: a kind, which is counted, plus a free-text reason, which people read.

A unit's skip record (store_schema/README.md, "Units") is {`index`, `key`, `kind`, `reason`}: `kind` is one
of SkipKind's values, `reason` the detail ("duplicate key '000003' in tar, first at index 1"). Counts by
kind (an extraction run's `skipped_by_reason`, `inspect_store`'s `skipped_by_kind`) read the kind, never
the text, so a reworded message keeps its count.

Stores written before kinds existed hold records with a `reason` only. `kind_of` reads those, and only
those, by the rule extraction counted by before, defined here and nowhere else: the first kind of
_TEXT_KINDS whose value occurs in the reason text, else OTHER (every message extraction writes contains its
kind's value; a failed unit's record, "cannot open input tar ...", reads as OTHER, as it was counted).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any


class SkipKind(str, Enum):
    """The kinds of skipped input; each value is the phrase its messages contain (and the count's key)."""

    UNDECODABLE_IMAGE = "undecodable image"
    DECOMPRESSION_BOMB = "decompression bomb"
    NO_IMAGE_MEMBER = "no image member"
    DUPLICATE_KEY = "duplicate key"  # in one tar, or a key another unit already stored
    DUPLICATE_MEMBER = "duplicate member"
    INCOMPLETE_SAMPLE = "incomplete sample"
    TRUNCATED_TAR = "truncated or corrupt tar"
    EMPTY_TAR = "empty tar"
    ZERO_SIZE = "zero-size"
    NON_FINITE = "non-finite"  # a teacher's features for the sample were NaN/inf
    NO_VIEWS = "cannot make views"
    UNREADABLE_TAR = "unreadable tar"  # a failed unit's one record: its input could not be opened or read
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


def skip_record(index: int, key: str | None, reason: str, kind: SkipKind | str | None = None) -> dict[str, Any]:
    """A skip record as stored. Without `kind` the record is written as before kinds (read by its text)."""
    rec: dict[str, Any] = {"index": int(index), "key": key}
    if kind is not None:
        rec["kind"] = SkipKind(kind).value
    rec["reason"] = reason
    return rec


def kind_of(record: Mapping[str, Any]) -> SkipKind:
    """A stored skip record's kind: its `kind`, or for a record without one (an older store) its text's."""
    kind = record.get("kind")
    if isinstance(kind, str) and kind in _VALUES:
        return SkipKind(kind)
    reason = str(record.get("reason") or "")
    return next((k for k in _TEXT_KINDS if k.value in reason), SkipKind.OTHER)


def count_kinds(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """{kind value: count} over skip records, sorted by kind value."""
    return dict(sorted(Counter(kind_of(r).value for r in records).items()))


_VALUES = frozenset(k.value for k in SkipKind)
# The kinds a record without `kind` can have, in the order its text is tested (the order of the old list).
_TEXT_KINDS = tuple(k for k in SkipKind if k not in (SkipKind.UNREADABLE_TAR, SkipKind.OTHER))
