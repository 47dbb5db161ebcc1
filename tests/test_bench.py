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
                                 "--backends", "auto,math", "--repeat", "1", "--modes", "exact,fp8,cache@0.5",
                                 "--memory", "model;configs/tora/memory/8gb.yaml,chunk=4,tile=16", "--modes-steps", "2",
                                 "--out", str(tmp_path), "model.sampler_config.params.num_steps=3",
                                 "model.sampler_config.params.guider_config.params.num_steps=3"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["sdpa_backend"] for r in saved["step"]] == ["auto", "math"]
    assert [e["mode"] for e in saved["e2e"]] == ["exact"] and saved["e2e"][0]["total"] > 0
    assert [m["offload"] for m in saved["memory"]] == ["model", "sequential"]
    assert [m["mode"] for m in results["modes"]] == ["exact", "fp8", "cache@0.5"]
    assert results["modes"][1]["psnr_db"] < float("inf")  # fp8 is not bit-exact
    assert "| CFG step, exact, sdpa=auto |" in capsys.readouterr().out


def test_memory_variants_expand_their_aliases_and_stack_recipes():
    offload, files, overrides = bench_sample.parse_memory_variant(
        "sequential, chunk=4,tile=16,model.motion.cache=features")
    assert (offload, files) == ("sequential", [])
    assert overrides == ["model.first_stage_config.params.encode_chunk_frames=4",
                         "model.first_stage_config.params.decode_tile_latent_size=16", "model.motion.cache=features"]
    offloads = []
    for variant in bench_sample.DEFAULT_MEMORY_VARIANTS.split(";"):  # every default variant is a valid config
        offload, files, overrides = bench_sample.parse_memory_variant(variant)
        cfg = bench_sample.make_config(tiny=False, overrides=overrides, extra_files=files)
        offloads.append(offload or cfg.args.offload)
    assert offloads == ["model", "model", "sequential"]  # the 8 GiB recipe sets its own offload mode
