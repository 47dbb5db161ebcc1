"""The GPU benchmark script must not break before it reaches the GPU: tiny smoke run on CPU."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_sample  # noqa: E402


def test_flop_count_reproduces_the_reference_figures():
    params = bench_sample.make_config(tiny=False).model.network_config.params
    assert bench_sample.cfg_step_flops(params, 13, 226) == pytest.approx(7.13e14, rel=2e-3)
    assert bench_sample.cfg_step_flops(params, 13, 226, motion=False) == pytest.approx(6.64e14, rel=2e-3)


def test_tiny_benchmark_runs_every_phase(tmp_path, capsys):
    results = bench_sample.main(["--tiny", "--device", "cpu", "--phases", "matmul,step,e2e,memory,modes",
                                 "--backends", "auto,math", "--repeat", "1", "--modes", "exact,fp8,cache",
                                 "--out", str(tmp_path), "model.sampler_config.params.num_steps=3",
                                 "model.sampler_config.params.guider_config.params.num_steps=3"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["sdpa_backend"] for r in saved["step"]] == ["auto", "math"]
    assert saved["e2e"]["total"] > 0 and [m["offload"] for m in saved["memory"]] == ["model", "sequential"]
    assert [m["mode"] for m in results["modes"]] == ["exact", "fp8", "cache"]
    assert results["modes"][1]["psnr_db"] < float("inf")  # fp8 is not bit-exact
    assert "| CFG step, sdpa=auto |" in capsys.readouterr().out
