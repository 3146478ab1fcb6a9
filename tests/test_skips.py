"""Skip records: a kind that is counted plus free text; records of older stores (text only) keep their counts."""
from __future__ import annotations

import pickle

import pytest

from store_schema.shards import ImageDecodeError, decode_image
from store_schema.skips import SkipKind, count_kinds, kind_of, skip_record

# The list extraction counted by before kinds existed, in its order: a record without `kind` reads by it.
OLD_REASON_KINDS = ("undecodable image", "decompression bomb", "no image member", "duplicate key", "duplicate member",
                    "incomplete sample", "truncated or corrupt tar", "empty tar", "zero-size", "non-finite",
                    "cannot make views")


def old_rule(reason: str) -> str:
    return next((k for k in OLD_REASON_KINDS if k in reason), "other")


@pytest.mark.parametrize("reason", [
    "d/0001.jpg: undecodable image: UnidentifiedImageError: cannot identify image file",
    "x.png: decompression bomb guard: 20x20 = 400 pixels exceeds data.max_image_pixels = 100",
    "no image member (members: d/0002.seg.png)",
    "duplicate key '000003' in tar, first at index 1",
    "duplicate key '000003': already stored by unit u-1 (a.tar)",
    "duplicate member 'd/0001.jpg' in sample",
    "incomplete sample: the tar is truncated or corrupt while reading it",
    "truncated or corrupt tar after 3 samples: ReadError: unexpected end of data",
    "empty tar: no samples",
    "x.jpg: zero-size image (0x0)",
    "non-finite features from teacher(s) mocov3",
    "cannot make views: box rounds to nothing",
    "cannot open input tar 'missing.tar': FileNotFoundError: ...",
    "cannot decode image: truncated JPEG",
])
def test_a_record_without_kind_reads_as_the_old_substring_rule_counted_it(reason):
    old = {"index": 0, "key": "k", "reason": reason}
    assert kind_of(old).value == old_rule(reason)
    assert skip_record(0, "k", reason) == old  # written without a kind: the record is as before


def test_a_record_with_kind_is_counted_by_it_whatever_its_text_says():
    rec = skip_record(4, "k", "reworded: the picture would not open", SkipKind.UNDECODABLE_IMAGE)
    assert rec == {"index": 4, "key": "k", "kind": "undecodable image",
                   "reason": "reworded: the picture would not open"}
    assert kind_of(rec) is SkipKind.UNDECODABLE_IMAGE
    assert kind_of({"kind": "not a kind", "reason": "empty tar: no samples"}) is SkipKind.EMPTY_TAR  # unknown: by text
    records = [rec, skip_record(0, None, "cannot open input tar", SkipKind.UNREADABLE_TAR),
               {"index": 1, "key": "a", "reason": "duplicate key 'a' in tar, first at index 0"},
               {"index": 2, "key": "b", "reason": "something new"}]
    assert count_kinds(records) == {"duplicate key": 1, "other": 1, "undecodable image": 1, "unreadable tar": 1}


def test_decode_errors_carry_their_kind_across_processes():
    with pytest.raises(ImageDecodeError) as bad:
        decode_image(b"not an image", 10**6)
    assert bad.value.kind is SkipKind.UNDECODABLE_IMAGE
    again = pickle.loads(pickle.dumps(ImageDecodeError("decompression bomb guard: big", SkipKind.DECOMPRESSION_BOMB)))
    assert again.kind is SkipKind.DECOMPRESSION_BOMB and str(again) == "decompression bomb guard: big"
