"""JPEG decode benchmark (issue 14, item 5): is decoding the next wall at GPU extraction rates?

Real photos (scikit-learn's two sample images) cut into ImageNet-sized crops (500 x 375, the median
ImageNet-1k image) and saved as JPEG (quality 90), decoded by:

  pil          — what extraction does (store_schema/shards.py: PIL, converted to RGB), per CPU-second
  pil+views    — that and everything else a decode worker does per image: both views cropped, resized to
                 224 and flipped, masks drawn, the student's pixels cut (extract/prepare.prepare_view)
  tv-cpu       — torchvision.io.decode_jpeg on the CPU (libjpeg-turbo), per CPU-second
  tv-cuda      — torchvision.io.decode_jpeg on the GPU (nvJPEG), batches of --batch, per wall-second
                 (only with a CUDA device)

torchvision 0.29 deprecates its image decoding in favour of TorchCodec (a DeprecationWarning): the tv rows
measure the decoder the issue names, not a recommendation to build on it.

One torch thread; medians of --repeats passes over all images. The goal it checks: one H100 extracting
>= 1,500 images/s needs 1,500 / (pil images per CPU-second) cores just to decode.

    python -m benchmarks.bench_decode [--images 256] [--repeats 5] [--batch 64]
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import bench_config, median_time, print_json, print_table


def jpeg_images(n: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> list[bytes]:
    """n JPEG files of `size`, random crops (and flips) of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images  # two 427 x 640 RGB photos
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = size
        scale = rng.uniform(1.0, 1.5)
        img = img.resize((int(w * scale), int(h * scale)), Image.BICUBIC)
        x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
        img = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _pil(files: list[bytes]) -> None:
    for f in files:
        Image.open(io.BytesIO(f)).convert("RGB").load()


def _pil_views(files: list[bytes], cfg) -> None:
    from extract.prepare import prepare_view
    for i, f in enumerate(files):
        image = Image.open(io.BytesIO(f)).convert("RGB")
        for v in range(cfg.views.num_views):
            prepare_view(cfg, image, f"{i:06d}", v)


def _tv_cpu(files: list[bytes]) -> None:
    from torchvision.io import decode_jpeg
    for f in files:
        decode_jpeg(torch.frombuffer(bytearray(f), dtype=torch.uint8))


def _tv_cuda(files: list[bytes], batch: int) -> None:
    from torchvision.io import decode_jpeg
    data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    for i in range(0, len(data), batch):
        decode_jpeg(data[i:i + batch], device="cuda")
    torch.cuda.synchronize()


def rate(fn, n: int, repeats: int, clock) -> float:
    """Median images per second of `clock` over `repeats` passes (one warm-up pass first)."""
    return n / median_time(fn, repeats, warmup=1, clock=clock)[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="images per nvJPEG call (tv-cuda)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    files = jpeg_images(args.images)
    cfg = bench_config([])  # pipeline.toml: 224 px, 2 views, its masks
    res = {"images": args.images, "mean_jpeg_kb": sum(map(len, files)) / len(files) / 1e3,
           "images_per_cpu_s": {"pil": rate(lambda: _pil(files), len(files), args.repeats, time.process_time),
                                "pil+views": rate(lambda: _pil_views(files, cfg), len(files), args.repeats,
                                                  time.process_time),
                                "tv-cpu": rate(lambda: _tv_cpu(files), len(files), args.repeats, time.process_time)}}
    if torch.cuda.is_available():
        res["images_per_wall_s"] = {"tv-cuda": rate(lambda: _tv_cuda(files, args.batch), len(files), args.repeats,
                                                    time.perf_counter)}
        res["device"] = torch.cuda.get_device_name()
    res["cores_to_decode_1500_per_s"] = {k: 1500 / v for k, v in res["images_per_cpu_s"].items()}
    print_table(f"JPEG decode: {args.images} images of 500 x 375 ({res['mean_jpeg_kb']:.0f} KB), median of "
                f"{args.repeats}", [
        *[(f"{k} images / CPU-s", f"{v:.0f}") for k, v in res["images_per_cpu_s"].items()],
        *[(f"{k} images / wall-s", f"{v:.0f}") for k, v in res.get("images_per_wall_s", {}).items()],
        *[(f"cores for 1,500 images/s ({k})", f"{v:.1f}") for k, v in res["cores_to_decode_1500_per_s"].items()],
    ])
    print_json("decode", res)
    return res


if __name__ == "__main__":
    main()
