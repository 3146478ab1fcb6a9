"""WebDataset input: expand shard URLs, stream samples out of one tar, decode images to RGB.

Why our own tar loop rather than `webdataset.tariterators`: WebDataset's iterator hands exceptions to
a handler that either stops or drops the member, so the ordinal of a sample in its tar (which the store
records as its source) is lost on the first bad member; and Python's `tarfile.next()` treats a truncated
or invalid header after the first member as a normal end of archive, so a cut tar would look complete.
We stream with `tarfile` (mode "r|*": any fsspec file object or a webdataset `pipe:` command's output, no
seeking, gz/bz2/xz detected) and group members exactly as WebDataset's `group_by_keys` does:

- key = member path up to the first dot of its basename (directories kept), extension = the rest,
  lower-cased: "a/b/0001.seg.png" -> ("a/b/0001", "seg.png") — `webdataset.tariterators.base_plus_ext`;
- consecutive members with the same key form one sample; non-regular members, names without a dot in
  the basename and `__meta__` names are not samples and are ignored, as in WebDataset.

Every sample group gets an index (0, 1, ...) whether it decodes or not; a bad one is yielded as
`Skipped` with a reason, never dropped. Decisions:

- image member: the first of IMAGE_EXTENSIONS present (exact extension, so "seg.png" is not the image);
  when several are present the sample keeps a `note` naming what was ignored;
- `cls`: UTF-8 text of an integer in [0, 2^31) -> label; anything else (not an integer, negative, too
  large) -> label None, sample kept (images are what extraction needs) and `note` says why, so the
  caller records it with the sample;
- alpha (RGBA, LA, PA, palette or colour-key transparency) is composited over white (how viewers
  show it; dropping alpha would expose arbitrary colours under transparent pixels);
- 16-bit grey is scaled by 255/65535 (PIL's own convert clips at 255, turning most images white);
  32-bit int and float images outside the 16-bit / [0, 1] range are min-max stretched;
- EXIF orientation is not applied and ICC profiles are ignored, like torchvision's default loader;
- the same key appearing again later in a tar: the later sample is Skipped (the store keys by it);
  the same member name twice within one sample (WebDataset raises): the sample is Skipped;
- a damaged tar: the samples read before the damage are yielded; the sample being read when it was hit
  is Skipped (it may be incomplete; when the damage is in a header we cannot tell whose, so the pending
  sample counts as hit), then one Skipped(key=None) says the rest of the tar is lost.

Everything returned is picklable, so `iter_tar` can run inside DataLoader worker processes.
"""
from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import braceexpand
import fsspec
import numpy as np
from PIL import Image

from store_schema.skips import SkipKind
from store_schema.storage import PipeReader, open_input, options_for, remote_problem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
LABEL_EXTENSION = "cls"
# Formats PIL may try on image bytes (misnamed members are common: PNG bytes in a .jpg; JPEG covers MPO). Never EPS/PS,
# which PIL decodes by running Ghostscript on untrusted input.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's skip_meta: "__key__"-like names are not members
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext


class ShardReadError(Exception):
    """An input tar (or URL list) could not be opened or read; the message names the URL."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url

    def __reduce__(self):  # keep `url` across processes (DataLoader workers pickle exceptions)
        return (type(self), (str(self), self.url))


class ImageDecodeError(ValueError):
    """Image bytes that cannot become an RGB image; the message is the reason recorded for the sample,
    `kind` what is counted."""

    def __init__(self, message: str, kind: SkipKind = SkipKind.UNDECODABLE_IMAGE) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across processes
        return (type(self), (str(self), self.kind))


@dataclass
class Sample:
    url: str
    index: int  # ordinal of the sample group in its tar, counting skipped groups
    key: str  # WebDataset __key__
    image: Image.Image  # RGB, fully decoded
    label: int | None
    note: str | None = None  # something the caller may want to record (unparsable cls, extra images)


@dataclass
class Skipped:
    url: str
    index: int
    key: str | None  # None when the damage is not attributable to one sample
    kind: SkipKind  # what is counted
    reason: str  # what is shown


# ----------------------------------------------------------------------------------------------
# URL lists


def expand_urls(urls: Sequence[str], storage_options: dict | None = None) -> list[str]:
    """Expand brace patterns and "@list.txt" entries into a flat list of tar URLs, order preserved.

    Each entry is a brace pattern ("train-{000000..000009}.tar"), a plain path or fsspec URL, or
    "@list.txt" (read via fsspec; one URL or brace pattern per line; blank lines and lines starting
    with '#' are skipped; paths inside are used as written, like command-line arguments).
    A URL listed twice is an error naming it (it would be extracted twice). `storage_options`: fsspec
    options for reading "@list" files (data.storage_options); a `pipe:` URL is kept as written.
    """
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    origin: dict[str, str] = {}
    for entry in urls:
        for url in _expand_entry(entry, storage_options):
            if url in origin:
                raise ValueError(f"input URL {url!r} is listed twice (from {origin[url]!r} and {entry!r})")
            origin[url] = entry
            out.append(url)
    return out


def _expand_entry(entry: str, storage_options: dict | None = None) -> list[str]:
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"input URL entry {entry!r} is empty or not a string")
    entry = entry.strip()
    if not entry.startswith("@"):
        return _braces(entry, entry)
    list_url = entry[1:]
    try:
        with fsspec.open(list_url, "rt", encoding="utf-8", **options_for(list_url, storage_options)) as f:
            lines = f.read().splitlines()
    except Exception as e:  # missing file, unknown protocol, decode error: all "cannot read"
        raise ShardReadError(f"cannot read URL list {list_url!r}: {type(e).__name__}: {e}", list_url) from e
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            raise ValueError(f"{list_url}:{n}: nested URL lists ({line!r}) are not supported")
        out += _braces(line, f"{list_url}:{n}")
    return out


def _braces(pattern: str, where: str) -> list[str]:
    try:
        return list(braceexpand.braceexpand(pattern))
    except ValueError as e:  # braceexpand.UnbalancedBracesError
        raise ValueError(f"bad brace pattern {pattern!r} ({where}): {e}") from None


# ----------------------------------------------------------------------------------------------
# One tar


def split_key(name: str) -> tuple[str | None, str | None]:
    """Member name -> (sample key, lower-case extension) by WebDataset's rule; (None, None) if no dot."""
    m = _KEY_EXT.match(name)
    if not m:
        return None, None
    return m.group(1), m.group(2).lower()


@dataclass
class _Group:
    key: str
    index: int
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> data
    names: list[str] = field(default_factory=list)
    problem: tuple[SkipKind, str] | None = None


def iter_tar(url: str, max_image_pixels: int, storage_options: dict | None = None,
             options_key: str = "data.storage_options") -> Iterator[Sample | Skipped]:
    """Yield every sample group of the tar at `url` (a path, an fsspec URL opened with `storage_options`,
    or a webdataset `pipe:CMD`) in order, as Sample or Skipped.

    Raises ShardReadError when the file cannot be opened or an I/O error interrupts reading (a `pipe:`
    command exiting non-zero is one); damage inside the tar is not an exception but a Skipped record (see
    the module docstring). An empty tar (or a zero-byte file) yields nothing. `options_key` names the
    setting to fix in the message for an unreachable endpoint, a missing bucket or missing credentials.
    """
    try:
        fobj = open_input(url, storage_options)
    except Exception as e:  # FileNotFoundError, PermissionError, unknown protocol, missing s3fs, ...
        remote = remote_problem(url, e, options_key, storage_options)  # starts with the URL
        why = f"cannot open input tar {remote}" if remote else f"cannot open input tar {url!r}: {type(e).__name__}: {e}"
        raise ShardReadError(why, url) from e
    with fobj:
        yield from _iter_stream(url, fobj, max_image_pixels)
        if isinstance(fobj, PipeReader):  # the tar's end marker was read: the command must also succeed
            try:
                fobj.finish()
            except OSError as e:
                raise ShardReadError(f"I/O error reading input tar {url!r}: {e}", url) from e


def _tracking_tarinfo(damage: list[Exception]) -> type[tarfile.TarInfo]:
    """A TarInfo class that records header errors which `tarfile.next()` would take for a clean end."""

    class TrackingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tf)
            except tarfile.EOFHeaderError:  # a zero block: the proper end-of-archive marker
                raise
            except tarfile.HeaderError as e:  # empty (cut at a member boundary), truncated, invalid
                damage.append(e)
                raise

    return TrackingTarInfo


def _iter_stream(url: str, fobj, max_image_pixels: int) -> Iterator[Sample | Skipped]:
    damage: list[Exception] = []
    seen: dict[str, int] = {}  # key -> index of its first sample
    index = 0
    group: _Group | None = None
    reading: str | None = None  # key of the member whose data is being read (None: between members)
    try:
        try:
            tf = tarfile.open(fileobj=fobj, mode="r|*", tarinfo=_tracking_tarinfo(damage))
        except tarfile.ReadError:
            if damage and isinstance(damage[0], tarfile.EmptyHeaderError):
                return  # a zero-byte file: nothing to read, the caller records "empty tar"
            raise
        for info in tf:
            if not info.isreg() or _META.match(info.name):
                continue
            key, ext = split_key(info.name)
            if key is None:
                continue
            reading = key
            data = tf.extractfile(info).read()
            reading = None
            if group is not None and key != group.key:
                yield _finish(url, group, seen, max_image_pixels)
                index, group = index + 1, None
            if group is None:
                group = _Group(key, index)
            if ext in group.members and group.problem is None:
                group.problem = (SkipKind.DUPLICATE_MEMBER, f"duplicate member {info.name!r} in sample")
            group.members.setdefault(ext, data)
            group.names.append(info.name)
            tf.members = []  # stream mode keeps every TarInfo otherwise: memory grows with the tar
        if damage:
            raise damage[0]
    except tarfile.TarError as e:
        if group is not None:
            if reading is not None and reading != group.key:  # damage in the next sample: this one is whole
                yield _finish(url, group, seen, max_image_pixels)
            else:  # damage in this sample's member, or in a header that may have been this sample's
                yield Skipped(url, group.index, group.key, SkipKind.INCOMPLETE_SAMPLE,
                              "incomplete sample: the tar is truncated or corrupt while reading it")
            index += 1
        yield Skipped(url, index, None, SkipKind.TRUNCATED_TAR,
                      f"truncated or corrupt tar after {index} samples: {_describe(e)}")
        return
    except OSError as e:  # the file system failed mid-read (tarfile reports data damage as TarError)
        raise ShardReadError(f"I/O error reading input tar {url!r} after {index} samples: "
                             f"{type(e).__name__}: {e}", url) from e
    if group is not None:
        yield _finish(url, group, seen, max_image_pixels)


def _describe(e: Exception) -> str:
    if isinstance(e, tarfile.EmptyHeaderError):
        return "file ends without the end-of-archive marker (cut at a member boundary)"
    return f"{type(e).__name__}: {e}"


def _finish(url: str, g: _Group, seen: dict[str, int], max_image_pixels: int) -> Sample | Skipped:
    """One complete sample group -> Sample, or Skipped with the reason."""
    first = seen.setdefault(g.key, g.index)
    if first != g.index:
        return Skipped(url, g.index, g.key, SkipKind.DUPLICATE_KEY,
                       f"duplicate key {g.key!r} in tar, first at index {first}")
    if g.problem is not None:
        return Skipped(url, g.index, g.key, *g.problem)
    present = [ext for ext in IMAGE_EXTENSIONS if ext in g.members]
    if not present:
        return Skipped(url, g.index, g.key, SkipKind.NO_IMAGE_MEMBER,
                       f"no image member (members: {', '.join(g.names)})")
    try:
        image = decode_image(g.members[present[0]], max_image_pixels)
    except ImageDecodeError as e:
        return Skipped(url, g.index, g.key, e.kind, f"{g.key}.{present[0]}: {e}")
    notes = []
    if len(present) > 1:
        notes.append(f"{len(present)} image members ({', '.join(present)}): used {present[0]}")
    label = None
    if LABEL_EXTENSION in g.members:
        label, problem = parse_label(g.members[LABEL_EXTENSION])
        if problem:
            notes.append(problem)
    return Sample(url, g.index, g.key, image, label, "; ".join(notes) or None)


MAX_LABEL = 2**31 - 1  # labels are stored as int64 but read by int32 consumers (class counts, one-hot votes)
_LABEL = re.compile(r"([+-]?)([0-9]+)")  # ASCII digits only: int() would also take "1_000" or "٣"


def parse_label(data: bytes) -> tuple[int | None, str | None]:
    """`cls` member bytes -> (label, None) for an integer in [0, 2^31), else (None, why it is not used).

    A label outside that range is not stored (it would fail `validate`, overflow int64, or make the kNN
    allocate one column per class up to it): the sample keeps label -1 and the reason is recorded with it.
    """
    try:
        m = _LABEL.fullmatch(data.decode("utf-8").strip())
    except UnicodeDecodeError:
        m = None
    if m is None:
        return None, f"cls member {data[:40]!r} is not an integer; label set to None"
    sign, digits = m.group(1), m.group(2).lstrip("0") or "0"
    if sign == "-" and digits != "0":
        return None, f"cls member {data[:40]!r} is a negative label (valid: 0 to {MAX_LABEL}); label set to None"
    if len(digits) > len(str(MAX_LABEL)) or int(digits) > MAX_LABEL:
        return None, f"cls member {data[:40]!r} is above the largest label {MAX_LABEL}; label set to None"
    return int(digits), None


# ----------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, max_image_pixels: int) -> Image.Image:
    """Encoded image bytes -> a fully decoded RGB PIL image; raises ImageDecodeError with the reason.

    The pixel count is checked from the header before any pixel is decoded. (PIL's own open-time guard,
    at twice its global Image.MAX_IMAGE_PIXELS, still applies; it is reported with the same phrase.)
    """
    try:
        im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb guard: {e}", SkipKind.DECOMPRESSION_BOMB) from None
    except Exception as e:  # PIL raises many types on bad bytes (OSError, SyntaxError, struct.error, ...)
        raise ImageDecodeError(f"undecodable image: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"zero-size image ({w}x{h})", SkipKind.ZERO_SIZE)
    if w * h > max_image_pixels:
        raise ImageDecodeError(f"decompression bomb guard: {w}x{h} = {w * h} pixels exceeds "
                               f"data.max_image_pixels = {max_image_pixels}", SkipKind.DECOMPRESSION_BOMB)
    try:
        im.load()
        return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb guard: {e}", SkipKind.DECOMPRESSION_BOMB) from None
    except Exception as e:
        raise ImageDecodeError(f"undecodable image ({im.format} {im.mode} {w}x{h}): "
                               f"{type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> a new 8-bit RGB image (decisions in the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGB (a copy), ...


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """A high-bit-depth grey array (H, W) -> uint8 (H, W), scaled rather than clipped.

    Integers within 0..65535 are 16-bit samples: scaled by 255/65535 (a dark image stays dark).
    Floats within [0, 1] are scaled by 255. Anything else is min-max stretched to 0..255.
    """
    is_float = np.issubdtype(a.dtype, np.floating)
    x = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(x.min()), float(x.max())
    if not is_float and lo >= 0 and hi <= 65535:
        x = x * (255.0 / 65535.0)
    elif is_float and lo >= 0 and hi <= 1:
        x = x * 255.0
    else:
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)
