#!/usr/bin/env python
"""The whole recipe of the small trained Tora (models/small/): data -> VAE -> text encoder -> T2V
base -> dense motion -> sparse motion -> I2V -> export -> evaluation samples.  Resumable by stage.

    python scripts/train_moving_objects.py                       # every stage not done yet
    python scripts/train_moving_objects.py --stages vae t2v_base # only these (if not done)
    python scripts/train_moving_objects.py --smoke               # a minute-long CPU run of every stage

About 15-20 minutes on one H200 (measured figures: docs/EVALUATION.md), hours on a CPU.  Every
training stage is ``sat/train_video.py`` with the stacked configs of ``configs/tora/small/``; the VAE
is trained by ``scripts/train_vae.py``.  Stages hand over through ``<work>/products/<stage>/`` (a
checkpoint folder ``--load`` reads) and write ``<work>/<stage>.done.json`` (time, figures) when done:
a stage whose file exists is skipped, so the recipe continues where an earlier call stopped, also on
a fresh machine given the products (``--carry-in DIR``: the ``<stage>.tar`` files of an earlier call).
``--out DIR`` receives ``<stage>.tar`` (done file + product) after each stage, and ``eval.tar`` (a
GPU call's $OUT).

A training stage gets ``--minutes`` of wall time at most (a watchdog): past it the run is stopped and
its last checkpoint (``args.save_interval``) becomes the product, marked as cut short.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SMALL = "configs/tora/model/tora_small.yaml"
SMALL_I2V = "configs/tora/model/tora_small_i2v.yaml"
STAGES = ["data", "t5", "vae", "t2v_base", "dense", "sparse", "i2v", "export", "eval"]
# stage -> (configs after the model config(s), the stage it loads, I2V)
TRAINING = {
    "t2v_base": (["configs/tora/small/stage0_t2v.yaml"], None, False),
    "dense": (["configs/tora/small/dense.yaml"], "t2v_base", False),
    "sparse": (["configs/tora/small/sparse.yaml"], "dense", False),
    "i2v": (["configs/tora/small/sparse.yaml", "configs/tora/small/i2v.yaml"], "sparse", True),
}
TRAIN_BASE = ["configs/tora/train_dense.yaml", "configs/tora/small/data.yaml"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="stages to run (default: all)")
    p.add_argument("--work", type=Path, default=REPO / "outputs/small", help="working folder (default %(default)s)")
    p.add_argument("--models", type=Path, default=REPO / "models/small", help="where export writes the model")
    p.add_argument("--out", type=Path, default=None, help="copy products and reports here after each stage")
    p.add_argument("--carry-in", type=Path, default=None, help="products/done files of an earlier call")
    p.add_argument("--train-clips", type=int, default=3000)
    p.add_argument("--held-out-clips", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    # Budgets sized from the H200 figures of docs/EVALUATION.md (section 7): three 10-minute calls,
    # [data t5 vae t2v_base] [dense sparse] [i2v export eval], with the machine's start in each.
    p.add_argument("--minutes", type=json.loads, default={"vae": 2.6, "t2v_base": 4.0, "dense": 3.5,
                                                          "sparse": 4.0, "i2v": 4.0},
                   help="wall-time budget per stage, JSON (default %(default)s)")
    p.add_argument("--iters", type=json.loads, default={},
                   help='training steps per stage, JSON, e.g. \'{"t2v_base": 2000}\' (default: the configs)')
    p.add_argument("--vae-steps", type=int, default=480, help="VAE steps (3.2 steps/s at batch 16 on an H200)")
    p.add_argument("--load-from", type=json.loads, default={},
                   help='start a stage from another stage\'s product, JSON, e.g. \'{"sparse": "t2v_base"}\'')
    p.add_argument("--eval-cases", type=json.loads, default={"t2v": 0, "i2v": 0},
                   help="held-out cases sampled per mode (0 = all), JSON")
    p.add_argument("--smoke", action="store_true", help="tiny data and few steps: checks the recipe on a CPU")
    return p.parse_args(argv)


class Recipe:
    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.data = self.work / "data"
        self.products = self.work / "products"
        self.work.mkdir(parents=True, exist_ok=True)
        if args.carry_in and args.carry_in.is_dir():  # <stage>.tar files of copy_out (repo-relative)
            for archive in sorted(args.carry_in.glob("*.tar")):
                subprocess.run(["tar", "-C", REPO, "-xf", archive], check=True)
                print(f"carried in {archive.name}")

    # -- bookkeeping -------------------------------------------------------------------------
    def done_file(self, stage: str) -> Path:
        return self.work / f"{stage}.done.json"

    def finish(self, stage: str, record: dict) -> None:
        self.done_file(stage).write_text(json.dumps(record, indent=1) + "\n")
        print(f"== {stage} done: {json.dumps(record)}", flush=True)
        if self.args.out:
            self.args.out.mkdir(parents=True, exist_ok=True)

    def run(self, cmd: list[str], minutes: float | None = None, env: dict | None = None) -> bool:
        """Run a command; with ``minutes``, stop it (SIGINT, then SIGKILL) when over time.  Returns
        True when it finished by itself."""
        print("$ " + " ".join(str(c) for c in cmd), flush=True)
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env={**os.environ, **(env or {})},
                                start_new_session=True)
        deadline = time.time() + 60 * minutes if minutes else None
        while proc.poll() is None:
            if deadline and time.time() > deadline:
                print(f"!! over its {minutes} min budget: stopping", flush=True)
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return False
            time.sleep(1)
        if proc.returncode:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(str(c) for c in cmd)}")
        return True

    def product(self, stage: str) -> Path:
        """Where a stage leaves its result: the VAE and T5 straight in the model folder (the paths
        tora_small.yaml names), the DiT stages in <work>/products/<stage> (a --load folder)."""
        return self.args.models / stage if stage in ("vae", "t5") else self.products / stage

    def common_overrides(self) -> list[str]:
        """The trained VAE and T5 (the config's own paths, unless --models moved them) and the VAE's
        scale factor (written into tora_small.yaml by export)."""
        report = json.loads((self.product("vae") / "vae_report.json").read_text())
        return [f"model.first_stage_config.params.ckpt_path={self.product('vae') / '3d-vae.pt'}",
                f"model.conditioner_config.params.emb_models.0.params.model_dir={self.product('t5')}",
                f"model.scale_factor={report['scale_factor']:.4f}"]

    # -- stages ------------------------------------------------------------------------------
    def stage_data(self):
        gen = [PY, "scripts/make_moving_objects.py", "--workers", self.args.workers]
        self.run(gen + ["--out", self.data / "train", "--num-clips", self.args.train_clips])
        self.run(gen + ["--held-out", "--out", self.data / "held_out", "--num-clips", self.args.held_out_clips])
        return {"train_clips": self.args.train_clips, "held_out_clips": self.args.held_out_clips}

    def stage_t5(self):
        sys.path.insert(0, str(REPO / "sat"))
        from tora.config import load_config
        from tora.text import write_tiny_t5
        cfg = load_config([REPO / SMALL])
        captions = sorted({p.read_text().strip() for p in (self.data / "train" / "labels").glob("*.txt")})
        d_model = cfg.model.network_config.params.modules.patch_embed_config.params.text_hidden_size
        write_tiny_t5(self.product("t5"), d_model=d_model, num_layers=2, num_heads=4, d_ff=128,
                      vocab_size=200, seed=0, sentences=captions)
        return {"d_model": d_model, "captions": len(captions)}

    def stage_vae(self):
        out = self.product("vae") / "3d-vae.pt"
        steps = 1 if self.args.smoke else self.args.vae_steps
        batch = 1 if self.args.smoke else 16
        self.run([PY, "scripts/train_vae.py", "--base", SMALL, "configs/tora/small/data.yaml",
                  "--data", self.data / "train", "--eval-data", self.data / "held_out", "--out", out,
                  "--state", self.work / "vae_train_state.pt",
                  "--steps", steps, "--batch-size", batch, "--workers", min(8, self.args.workers),
                  "--max-minutes", self.args.minutes.get("vae", 0), *(["--eval-clips", 1] if self.args.smoke else [])])
        import torch  # the product in fp16: later stages only encode with it (half the bytes to carry)
        state = torch.load(out, map_location="cpu", weights_only=True)
        torch.save({"state_dict": {k: v.half() for k, v in state["state_dict"].items()}}, out)
        return json.loads((out.parent / "vae_report.json").read_text())

    def stage_training(self, stage: str):
        configs, parent, i2v = TRAINING[stage]
        parent = self.args.load_from.get(stage, parent)
        model = [SMALL, SMALL_I2V] if i2v else [SMALL]
        save = self.work / "runs"
        cmd = [PY, "sat/train_video.py", "--base", *model, *TRAIN_BASE, *configs,
               f"args.save={save}", f"args.train_data=[{self.data / 'train'}]", *self.common_overrides()]
        if parent:
            cmd.append(f"args.load={self.products / parent}")
        iters = self.args.iters.get(stage)
        if self.args.smoke:
            iters = 4
            cmd += ["deepspeed.train_micro_batch_size_per_gpu=2", "args.num_workers=0",
                    "model.first_stage_config.params.encode_batch_size=2"]
        if iters:
            cmd.append(f"args.train_iters={iters}")
        if self.args.smoke:
            cmd.append("args.save_interval=2")
        start = time.time()
        finished = self.run(cmd, minutes=None if self.args.smoke else self.args.minutes.get(stage))
        run_dir = newest_run(save, experiment_name(configs))
        iteration = int((run_dir / "latest").read_text().strip())
        product = self.products / stage
        shutil.rmtree(product, ignore_errors=True)
        product.mkdir(parents=True)
        import torch  # the product in bf16 (what the GPU stages train in): half the bytes to carry
        state = torch.load(run_dir / str(iteration) / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)
        module = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state["module"].items()}
        torch.save({"module": module}, product / "mp_rank_00_model_states.pt")
        shutil.copy(run_dir / "metrics.jsonl", product / "metrics.jsonl")
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return {"run": str(run_dir), "iteration": iteration, "finished": finished,
                "minutes": round((time.time() - start) / 60, 2), "first_loss": losses[0] if losses else None,
                "last_loss_mean50": sum(losses[-50:]) / max(1, len(losses[-50:]))}

    def stage_export(self):
        """models/small/{t2v,i2v,vae,t5}: the bf16 DiTs and fp16 VAE of the products (half the bytes; the
        loaders cast), the ABOUT note the engine prints, and the VAE's scale factor in tora_small.yaml."""
        models = self.args.models
        report = json.loads((self.product("vae") / "vae_report.json").read_text())
        about = ABOUT.format(date=time.strftime("%Y-%m-%d"))
        sizes = {}
        for name, stage in [("t2v", "sparse"), ("i2v", "i2v")]:  # products are bf16 already
            target = models / name / "mp_rank_00_model_states.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.products / stage / "mp_rank_00_model_states.pt", target)
            sizes[name] = target.stat().st_size
        sizes["vae"] = (models / "vae" / "3d-vae.pt").stat().st_size  # fp16 since the vae stage
        sizes["t5"] = sum(p.stat().st_size for p in (models / "t5").iterdir())
        for name in ("t2v", "i2v", "vae", "t5"):
            (models / name / "ABOUT").write_text(about)
        config = REPO / SMALL
        if self.args.smoke:  # a smoke run leaves the real model's config alone
            return {"bytes": sizes, "scale_factor": round(report["scale_factor"], 4)}
        text = re.sub(r"^(  scale_factor: )\S+", rf"\g<1>{report['scale_factor']:.4f}", config.read_text(), count=1,
                      flags=re.M)
        config.write_text(text)
        return {"bytes": sizes, "total_mib": round(sum(sizes.values()) / 2 ** 20, 2),
                "scale_factor": round(report["scale_factor"], 4)}

    def first_cases(self, source: Path, count: int, target: Path) -> Path:
        """The first ``count`` cases of a held-out case file, its relative paths made absolute."""
        folder = source.parent
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = source.read_text().splitlines(True)[:count]
        target.write_text("".join(lines).replace('"points/', f'"{folder}/points/').replace('"images/', f'"{folder}/images/'))
        return target

    def sample(self, models: list[str], load: Path, cases: Path, out: Path, *extra: str) -> float:
        """One sample_video.py run over a case file; returns its minutes."""
        cmd = [PY, "sat/sample_video.py", "--base", *models, "configs/tora/inference.yaml", "--load", load,
               "--input-file", cases, "--output-dir", out, *extra, *self.common_overrides()]
        if self.args.smoke:
            cmd.append("model.sampler_config.params.num_steps=2")
        start = time.time()
        self.run(cmd)
        return round((time.time() - start) / 60, 2)

    def stage_eval(self):
        """Held-out cases sampled with and without motion, T2V and I2V, from the exported model."""
        held_out = self.data / "held_out"
        eval_dir = self.work / "eval"
        shutil.rmtree(eval_dir, ignore_errors=True)  # a re-run must not pair with -1 suffixed leftovers
        record = {}
        for mode, models, extra in [("t2v", [SMALL], []), ("i2v", [SMALL, SMALL_I2V], ["--image2video"])]:
            cases = held_out / f"cases_{mode}.jsonl"
            count = self.args.eval_cases.get(mode, 0)
            if count:  # the first `count` cases only
                cases = self.first_cases(cases, count, eval_dir / f"{mode}_cases.jsonl")
            for motion in (True, False):
                name = mode if motion else f"{mode}_nomotion"
                no_motion = [] if motion else ["--no-flow-injection"]
                minutes = self.sample(models, self.args.models / mode, cases, eval_dir / name, *extra, *no_motion)
                record[name] = {"minutes": minutes}
        # TrajError against training: the first 8 T2V cases through each stage's product (motion on)
        curve = self.first_cases(held_out / "cases_t2v.jsonl", 8, eval_dir / "curve_cases.jsonl")
        for stage in [s for s in ("t2v_base", "dense", "sparse") if (self.products / s).is_dir()]:
            self.sample([SMALL], self.products / stage, curve, eval_dir / f"curve_{stage}")
        if self.args.out:  # the videos (and their trajectory records): scored by scripts/eval_traj.py
            subprocess.run(["tar", "-C", self.work, "-cf", self.args.out / "eval.tar", "eval"], check=True)
        return record

    def copy_out(self, stage: str) -> None:
        """``<out>/<stage>.tar``: the stage's done file and product folder (what a later call carries
        in); one file per stage, as a GPU call brings back at most a few files."""
        if not self.args.out or stage in ("export", "eval"):
            return
        members = [self.done_file(stage)] + ([self.product(stage)] if self.product(stage).is_dir() else [])
        members = [str(m.resolve().relative_to(REPO)) for m in members]
        subprocess.run(["tar", "-C", REPO, "-cf", self.args.out / f"{stage}.tar", *members], check=True)


ABOUT = ("A SMALL model trained on synthetic moving shapes (discs, squares, triangles, stars on plain, textured "
         "and sky/grass backgrounds; 25 frames of 96x144), by scripts/train_moving_objects.py ({date}). "
         "It follows trajectories of such shapes; it knows nothing else.\n")


def experiment_name(configs: list[str]) -> str:
    name = None
    for config in configs:
        match = re.search(r"^\s*experiment_name:\s*(\S+)", (REPO / config).read_text(), re.M)
        name = match.group(1) if match else name
    return name


def newest_run(save: Path, name: str) -> Path:
    runs = sorted((p for p in save.glob(f"{name}-*") if (p / "latest").is_file()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no finished checkpoint of {name} under {save}")
    return runs[-1]


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.train_clips, args.held_out_clips = 8, 2
        args.work = args.work.with_name(args.work.name + "-smoke")
        args.models = args.work / "models"
    recipe = Recipe(args)
    table = []
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if recipe.done_file(stage).is_file():
            print(f"== {stage}: already done ({recipe.done_file(stage)})")
            table.append((stage, "done before", ""))
            continue
        if stage != "data" and not (recipe.data / "train").is_dir():
            recipe.stage_data()  # data is remade (deterministic) when a fresh machine resumes
        start = time.time()
        method = getattr(recipe, f"stage_{stage}", None) or (lambda s=stage: recipe.stage_training(s))
        record = method()
        record["stage_minutes"] = round((time.time() - start) / 60, 2)
        recipe.finish(stage, record)
        recipe.copy_out(stage)
        table.append((stage, f"{record['stage_minutes']} min", json.dumps(record)[:150]))
    print("\n| stage | time | result |\n|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
