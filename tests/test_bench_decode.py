"""benchmarks/bench_decode.py runs on the CPU and reports what it measured (the GPU row needs a device)."""
from __future__ import annotations

import torch

from benchmarks.bench_decode import main


def test_decode_benchmark_reports_per_core_rates(capsys):
    res = main(["--images", "6", "--repeats", "1"])
    rates = res["images_per_cpu_s"]
    assert set(rates) == {"pil", "pil+views", "tv-cpu"} and all(r > 0 for r in rates.values())
    assert rates["pil+views"] < rates["pil"]  # the same decode plus two prepared views
    assert res["cores_to_decode_1500_per_s"]["pil"] == 1500 / rates["pil"]
    assert ("images_per_wall_s" in res) == torch.cuda.is_available()
    assert "BENCH_JSON" in capsys.readouterr().out
