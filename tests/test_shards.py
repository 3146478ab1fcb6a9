"""WebDataset input: URL expansion, sample grouping and indices, every kind of bad input, image modes."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from wds_fixtures import (
    good_samples,
    make_image,
    make_image_bytes,
    make_png_header_bytes,
    member_offsets,
    truncate,
    write_members,
    write_tar,
)
from webdataset.tariterators import base_plus_ext

from extract.views import ViewParams, apply_view
from store_schema.shards import (
    ImageDecodeError,
    Sample,
    ShardReadError,
    Skipped,
    decode_image,
    expand_urls,
    iter_tar,
    split_key,
)

BIG = 89478485  # the shipped data.max_image_pixels


def run(path, max_pixels: int = BIG) -> list[Sample | Skipped]:
    return list(iter_tar(str(path), max_pixels))


def brief(items) -> list[tuple]:
    return [(type(x).__name__, x.index, x.key) for x in items]


# ----------------------------------------------------------------------------------------------
# URL expansion


def test_expand_braces_paths_and_lists(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# shards of split b\n\nb-{0..1}.tar\n  s3://bucket/c.tar  \n", encoding="utf-8")
    urls = expand_urls(["a-{000..002}.tar", "plain.tar", f"@{lst}", "file:///x/y.tar"])
    assert urls == ["a-000.tar", "a-001.tar", "a-002.tar", "plain.tar", "b-0.tar", "b-1.tar",
                    "s3://bucket/c.tar", "file:///x/y.tar"]
    assert expand_urls("one.tar") == ["one.tar"]


def test_expand_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'a-001.tar' is listed twice"):
        expand_urls(["a-{000..002}.tar", "a-001.tar"])
    with pytest.raises(ShardReadError, match="missing.txt"):
        expand_urls([f"@{tmp_path / 'missing.txt'}"])
    nested = tmp_path / "nested.txt"
    nested.write_text("@other.txt\n")
    with pytest.raises(ValueError, match="nested"):
        expand_urls([f"@{nested}"])
    with pytest.raises(ValueError, match="brace"):
        expand_urls(["a-{0..1.tar"])
    with pytest.raises(ValueError, match="empty"):
        expand_urls([" "])


# ----------------------------------------------------------------------------------------------
# grouping convention


def test_split_key_matches_webdataset():
    names = ["0001.jpg", "0001.JPG", "dir/0001.seg.png", "dir.v2/a.b.jpg", "noext", ".hidden", "a/.b.jpg",
             "x/y/z.tar.gz", "key.with.dots.cls"]
    for name in names:
        key, ext = base_plus_ext(name)
        assert split_key(name) == (key, ext.lower() if ext else ext), name


def test_good_samples_in_order(tmp_path):
    p = write_tar(tmp_path / "s-000.tar", good_samples(5, size=(40, 30)))
    items = run(p)
    assert brief(items) == [("Sample", i, f"{i:06d}") for i in range(5)]
    for i, s in enumerate(items):
        assert s.url == str(p) and s.label == i % 10 and s.note is None
        assert s.image.mode == "RGB" and s.image.size == (40, 30)
    assert pickle.loads(pickle.dumps(items[0])).image.tobytes() == items[0].image.tobytes()


def test_members_grouped_like_webdataset(tmp_path):
    rgb = make_image_bytes("RGB", (8, 8), "png")
    p = write_members(tmp_path / "t.tar", [
        ("__index__", b"meta"),  # WebDataset metadata: not a sample
        ("d/0001.PNG", rgb), ("d/0001.cls", b" 7\n"), ("d/0001.json", b"{}"),
        ("README", b"no dot: not a member of any sample"),
        ("d/0002.seg.png", rgb),  # "seg.png" is not the image extension "png"
        ("d/0003.jpg", make_image_bytes("RGB", (8, 8), "jpg")), ("d/0003.png", rgb), ("d/0003.cls", b"n/a"),
    ])
    a, b, c = run(p)
    assert (a.key, a.label, a.index) == ("d/0001", 7, 0)
    assert isinstance(b, Skipped) and b.index == 1 and "no image member" in b.reason and "d/0002.seg.png" in b.reason
    assert (c.key, c.index, c.label) == ("d/0003", 2, None)
    assert "used jpg" in c.note and "not an integer" in c.note


def test_gzipped_tar(tmp_path):
    p = write_tar(tmp_path / "s.tar.gz", good_samples(3), gzip=True)
    assert brief(run(p)) == [("Sample", i, f"{i:06d}") for i in range(3)]


# ----------------------------------------------------------------------------------------------
# bad samples inside a good tar


def test_bad_samples_skipped_with_reasons(tmp_path):
    g = good_samples(3)
    samples = [
        g[0],
        {"__key__": "bad_bytes", "jpg": b"this is not a jpeg", "cls": 1},
        {"__key__": "text_only", "txt": "hello", "cls": 2},
        g[1],
        {**g[0], "cls": 9},  # key 000000 again
        {"__key__": "bomb", "png": make_png_header_bytes(20000, 20000)},
        {"__key__": "cut_jpeg", "jpg": make_image_bytes("RGB", (64, 64), "jpg")[:300]},
        {"__key__": "zero", "png": make_png_header_bytes(0, 10)},
        g[2],
    ]
    items = run(write_tar(tmp_path / "mixed.tar", samples))
    assert [x.index for x in items] == list(range(9))
    assert [x.key for x in items] == [s["__key__"] for s in samples]
    kinds = [type(x).__name__ for x in items]
    assert kinds == ["Sample", "Skipped", "Skipped", "Sample", "Skipped", "Skipped", "Skipped", "Skipped", "Sample"]
    reasons = {x.key: x.reason for x in items if isinstance(x, Skipped) and x.key != "000000"}
    assert "undecodable image" in reasons["bad_bytes"] and "bad_bytes.jpg" in reasons["bad_bytes"]
    assert "no image member" in reasons["text_only"] and "text_only.txt" in reasons["text_only"]
    assert "decompression bomb" in reasons["bomb"]
    assert "undecodable image" in reasons["cut_jpeg"] and "truncated" in reasons["cut_jpeg"].lower()
    assert "undecodable image" in reasons["zero"] or "zero-size" in reasons["zero"]
    dup = items[4]
    assert dup.key == "000000" and "duplicate key" in dup.reason and "first at index 0" in dup.reason


def test_duplicate_member_in_sample(tmp_path):
    jpg = make_image_bytes("RGB", (8, 8), "jpg")
    p = write_members(tmp_path / "t.tar", [("a.jpg", jpg), ("a.jpg", jpg), ("b.jpg", jpg)])
    a, b = run(p)
    assert isinstance(a, Skipped) and "duplicate member" in a.reason
    assert isinstance(b, Sample) and b.index == 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_checked_before_decoding(tmp_path):
    # 10000 x 10000 passes PIL's own open-time guard (2x its global limit) but not ours
    with pytest.raises(ImageDecodeError, match=r"decompression bomb guard: 10000x10000 .* data.max_image_pixels"):
        decode_image(make_png_header_bytes(10000, 10000), BIG)
    p = write_tar(tmp_path / "t.tar", good_samples(2, size=(20, 20)))
    a, b = run(p, max_pixels=399)
    assert isinstance(a, Skipped) and "decompression bomb" in a.reason and "20x20 = 400" in a.reason
    assert all(isinstance(x, Sample) for x in run(p, max_pixels=400))
    assert Image.MAX_IMAGE_PIXELS == BIG  # global PIL state untouched


# ----------------------------------------------------------------------------------------------
# image modes


@pytest.mark.parametrize("mode,fmt", [("L", "png"), ("1", "png"), ("CMYK", "jpg"), ("CMYK", "tiff"),
                                      ("RGB", "webp"), ("LA", "png"), ("I", "tiff"), ("F", "tiff")])
def test_modes_become_rgb(tmp_path, mode, fmt):
    member = "png" if fmt == "tiff" else fmt  # TIFF is no sample extension, but misnamed bytes decode
    p = write_tar(tmp_path / "t.tar", [{"__key__": "k", member: make_image_bytes(mode, (33, 17), fmt)}])
    (s,) = run(p)
    assert isinstance(s, Sample) and s.image.mode == "RGB" and s.image.size == (33, 17)
    a = np.asarray(s.image)
    assert a.max() - a.min() > 100  # the test pattern's contrast survives conversion


def test_16bit_png_scaled_not_clipped(tmp_path):
    src = make_image("I;16", (64, 8))
    p = write_tar(tmp_path / "t.tar", [{"__key__": "k", "png": make_image_bytes("I;16", (64, 8), "png")}])
    (s,) = run(p)
    a = np.asarray(s.image)
    assert a.min() <= 5 and a.max() >= 250  # full range kept (clipping would make nearly all 255)
    expect = np.round(np.asarray(src).astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(a[..., 0], expect) and np.array_equal(a[..., 0], a[..., 2])


def test_rgba_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (10, 20, 30, 0)  # fully transparent: whatever the colour, shown as background
    rgba[:, 2:] = (10, 20, 30, 255)  # opaque
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = np.asarray(decode_image(buf.getvalue(), BIG))
    assert (out[:, :2] == 255).all() and (out[:, 2:] == (10, 20, 30)).all()


def test_palette_transparency():
    data = make_image_bytes("P", (16, 16), "png")
    src = Image.open(io.BytesIO(data))
    idx = np.asarray(src)
    out = np.asarray(decode_image(data, BIG))
    assert out.shape == (16, 16, 3)
    assert (out[idx == 0] == 255).all()  # palette entry 0 is transparent
    assert (idx != 0).any() and not (out[idx != 0] == 255).all()


def test_image_smaller_than_crop(tmp_path):
    p = write_tar(tmp_path / "t.tar", [{"__key__": "tiny", "jpg": make_image_bytes("RGB", (5, 7), "jpg")}])
    (s,) = run(p)
    assert isinstance(s, Sample) and s.image.size == (5, 7)
    assert apply_view(s.image, ViewParams(0.0, 0.0, 1.0, 1.0, False), 224, "bicubic").shape == (3, 224, 224)


# ----------------------------------------------------------------------------------------------
# damaged, empty, missing tars


def test_truncated_mid_member(tmp_path):
    p = write_tar(tmp_path / "t.tar", good_samples(4))
    start, size = member_offsets(p)["000002.jpg"]
    truncate(p, start + size // 2)
    items = run(p)
    assert brief(items[:2]) == [("Sample", 0, "000000"), ("Sample", 1, "000001")]
    # damage in sample 2's data: sample 1 was complete and is kept; sample 2 and the rest are lost
    assert brief(items[2:]) == [("Skipped", 2, None)]
    assert "truncated or corrupt tar after 2 samples" in items[2].reason


def test_truncated_in_a_sample_member(tmp_path):
    p = write_tar(tmp_path / "t.tar", good_samples(4))
    start, _ = member_offsets(p)["000001.cls"]
    truncate(p, start - 512 + 100)  # inside the header of sample 1's second member
    items = run(p)
    assert brief(items) == [("Sample", 0, "000000"), ("Skipped", 1, "000001"), ("Skipped", 2, None)]
    assert "incomplete sample" in items[1].reason
    assert "truncated or corrupt tar after 2 samples" in items[2].reason


def test_cut_at_member_boundary_is_detected(tmp_path):
    p = write_tar(tmp_path / "t.tar", good_samples(3))
    start, _ = member_offsets(p)["000002.jpg"]
    truncate(p, start - 512)  # exactly before a header: tarfile alone would call this a clean end
    items = run(p)
    assert isinstance(items[-1], Skipped) and items[-1].key is None
    assert "end-of-archive marker" in items[-1].reason
    assert all(isinstance(x, Sample) for x in items[:1])


def test_garbage_empty_and_zero_byte(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"x" * 2000)
    (g,) = run(garbage)
    assert isinstance(g, Skipped) and g.index == 0 and "truncated or corrupt tar after 0 samples" in g.reason
    assert run(write_members(tmp_path / "empty.tar", [])) == []
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    assert run(zero) == []


def test_missing_file_raises_shard_read_error(tmp_path):
    url = str(tmp_path / "nope-000.tar")
    with pytest.raises(ShardReadError, match="nope-000.tar") as info:
        run(url)
    err = pickle.loads(pickle.dumps(info.value))  # crosses DataLoader worker processes intact
    assert isinstance(err, ShardReadError) and err.url == url and "nope-000.tar" in str(err)


def test_fsspec_urls(tmp_path):
    p = write_tar(tmp_path / "t.tar", good_samples(2))
    assert brief(run("file://" + str(p))) == [("Sample", 0, "000000"), ("Sample", 1, "000001")]
    fs = fsspec.filesystem("memory")
    fs.pipe("/comad-test/m-000.tar", Path(p).read_bytes())
    try:
        items = run("memory://comad-test/m-000.tar")
        assert brief(items) == [("Sample", 0, "000000"), ("Sample", 1, "000001")]
        assert items[0].url == "memory://comad-test/m-000.tar"
    finally:
        fs.rm("/comad-test", recursive=True)


class _TarDataset(torch.utils.data.IterableDataset):
    def __init__(self, url: str) -> None:
        self.url = url

    def __iter__(self):
        return iter_tar(self.url, BIG)


def test_iter_tar_in_dataloader_worker(tmp_path):
    from torch.utils.data import DataLoader

    p = write_tar(tmp_path / "t.tar", good_samples(2) + [{"__key__": "bad", "jpg": b"junk"}])
    items = list(DataLoader(_TarDataset(str(p)), batch_size=None, num_workers=1, collate_fn=lambda x: x))
    assert brief(items) == [("Sample", 0, "000000"), ("Sample", 1, "000001"), ("Skipped", 2, "bad")]
    assert items[0].image.mode == "RGB" and items[0].label == 0
    # a worker's exception reaches the main process as ExceptionWrapper -> exc_type(message); done
    # here directly, because a DataLoader whose worker raised takes seconds to shut down
    from torch._utils import ExceptionWrapper

    try:
        list(_TarDataset(str(tmp_path / "missing.tar")))
    except ShardReadError:
        wrapped = pickle.loads(pickle.dumps(ExceptionWrapper(where="in DataLoader worker process 0")))
    with pytest.raises(ShardReadError, match="missing.tar"):
        wrapped.reraise()
