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
