"""The committed small model (models/small/, trained by scripts/train_moving_objects.py) follows
trajectories: sampled on the CPU for held-out cases with and without motion conditioning, scored
with the colour tracker of the TrajError protocol (docs/EVALUATION.md).

Random weights fail this test: it guards the whole train -> sample pipeline (weights, configs,
trajectory preprocessing, motion conditioning, VAE, evaluation)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))

from tora.evaluation import EvalConfig, evaluate, load_run  # noqa: E402
from tora.moving_objects import GeneratorConfig, held_out_clip, write_held_out  # noqa: E402

MODELS = REPO / "models" / "small"
SMALL = ["configs/tora/model/tora_small.yaml"]
SMALL_I2V = SMALL + ["configs/tora/model/tora_small_i2v.yaml"]
NUM_CASES = 4
STEPS = 10  # a few denoising steps keep the test near a minute; the protocol uses 50

pytestmark = pytest.mark.skipif(not (MODELS / "t2v" / "mp_rank_00_model_states.pt").is_file(),
                                reason="the trained small model is not in models/small (scripts/train_moving_objects.py)")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Held-out cases (paths from seeds never used in training), as case files."""
    out = tmp_path_factory.mktemp("held_out")
    cfg = GeneratorConfig()
    write_held_out(out, [held_out_clip(index, 7, cfg) for index in range(NUM_CASES)], cfg)
    return out


def sample(cases: Path, out: Path, i2v: bool, motion: bool) -> Path:
    from sample_video import main
    argv = ["--base", *(SMALL_I2V if i2v else SMALL), "configs/tora/inference.yaml",
            "--load", str(MODELS / ("i2v" if i2v else "t2v")), "--input-file",
            str(cases / ("cases_i2v.jsonl" if i2v else "cases_t2v.jsonl")), "--output-dir", str(out),
            "--device", "cpu", f"model.sampler_config.params.num_steps={STEPS}"]
    if i2v:
        argv.append("--image2video")
    if not motion:
        argv.append("--no-flow-injection")
    main(argv)
    return out


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_small_model_follows_the_trajectory(cases, tmp_path, monkeypatch, i2v):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "sat"))
    with_motion = load_run(sample(cases, tmp_path / "motion", i2v, motion=True))
    without = load_run(sample(cases, tmp_path / "no_motion", i2v, motion=False), requested_from=with_motion)
    cfg = EvalConfig(tracker="colour")
    scored = evaluate(with_motion, cfg)
    baseline = evaluate(without, cfg, colours=scored.colours)
    report = {"with": scored.summary["l2"], "without": baseline.summary["l2"],
              "found": scored.summary["found"]}
    print(json.dumps(report))
    assert scored.summary["l2"] < 0.5 * baseline.summary["l2"], report
