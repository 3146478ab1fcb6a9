"""benchmarks/bench_reader.py runs end to end (tiny shapes) and reports what issue 14 asks for."""
from __future__ import annotations

from benchmarks.bench_reader import main


def test_bench_reader_quick_runs_and_reports(tmp_path, capsys):
    res = main(["--quick", "--dim", "16", "--samples", "16", "--unit-samples", "8", "--batch", "4",
                "--batches", "2", "--repeats", "1", "--dtypes", "float16", "int8", "--compressions", "none", "zstd",
                "--workers", "0", "1", "--no-compact", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "BENCH_JSON" in out and "samples/CPU-s" in out
    keys = set(res["samples_per_cpu_s"])
    for e in ("zarr", "direct"):
        for d in ("float16", "int8"):
            for c in ("none", "zstd"):
                for w in (0, 1):
                    assert f"{e}/{d}/{c}/w{w}" in keys
    assert all(v > 0 for v in res["samples_per_cpu_s"].values())
    assert res["bytes_per_view"]["int8/none"] < res["bytes_per_view"]["float16/none"]


def test_bench_reader_reports_the_compact_store(tmp_path, capsys):
    res = main(["--quick", "--dim", "96", "--samples", "16", "--unit-samples", "8", "--batch", "4",
                "--batches", "2", "--repeats", "1", "--dtypes", "float16", "--compressions", "zstd",
                "--workers", "0", "--out", str(tmp_path)])
    assert "direct/compact/zstd/w0" in res["samples_per_cpu_s"]
    # 96-d teachers mapped to the 192-d student width: the "compact" store is larger here, and says so
    assert res["compact_over_float16_ratio"] > 1
    assert "compact_over_float16_ratio" in capsys.readouterr().out


def test_the_ratio_is_the_shipped_compact_codec_over_todays_store(tmp_path):
    from distill.compact import COMPRESSION, COMPRESSION_LEVEL
    shipped = f"{COMPRESSION}{COMPRESSION_LEVEL}"
    res = main(["--quick", "--dim", "96", "--samples", "16", "--unit-samples", "8", "--batch", "4",
                "--batches", "1", "--repeats", "1", "--dtypes", "float16", "--compressions", "zstd", shipped,
                "--workers", "0", "--engines", "direct", "--out", str(tmp_path)])
    b = res["bytes_per_view"]
    assert res["compact_over_float16_ratio_of"] == f"compact/{shipped} over float16/zstd"
    assert res["compact_over_float16_ratio"] == b[f"compact/{shipped}"] / b["float16/zstd"]
    assert res["compact_over_float16_ratio_by_compression"]["zstd"] == b["compact/zstd"] / b["float16/zstd"]
    # the shipped codec (byte shuffle, blocks large enough) stores the same float16 features in fewer bytes
    assert b[f"float16/{shipped}"] < b["float16/zstd"] and b[f"compact/{shipped}"] < b["compact/zstd"]
    assert set(res["write_s"]) == set(b)


def test_photo_pixels_compress_and_noise_does_not(tmp_path):
    common = ["--quick", "--dim", "16", "--samples", "8", "--unit-samples", "8", "--batch", "4", "--batches", "1",
              "--repeats", "1", "--dtypes", "float16", "--compressions", "zstd", "--workers", "0", "--engines",
              "direct", "--no-compact"]
    noise = main([*common, "--out", str(tmp_path / "noise")])["bytes_per_view"]["float16/zstd"]
    photo = main([*common, "--pixels", "photo", "--out", str(tmp_path / "photo")])
    assert photo["pixels"] == "photo" and photo["bytes_per_view"]["float16/zstd"] < 0.97 * noise
