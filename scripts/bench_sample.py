#!/usr/bin/env python
"""Sampling benchmark: DiT step time, end-to-end video time, peak memory and fast-mode quality.

Full size (default) = the released T2V architecture with RANDOM weights (speed and memory do not depend
on the values): 42 layers x 3072, 49 frames at 480x720 -> 13x60x90 latents, 226 text tokens, motion on,
bf16.  ``--tiny`` runs the same phases on the tiny config (CPU smoke test).

Phases (``--phases``, comma-separated):
  matmul   measured bf16 matmul rate of this machine (the "floor" = FLOPs / this rate)
  step     one CFG denoising step (batch 2), median of several after warm-up, per attention kernel
  profile  torch.profiler table of the top kernels of one step
  e2e      one 50-step video end to end (T5, trajectory -> motion latents, sampling, VAE decode), offload
           none, for each of ``--e2e-modes`` (exact, compile)
  memory   peak GPU memory of each ``--memory`` variant (short runs), overall and per stage
  modes    fast modes (compile, fp8, step cache, combined): average step time over a full sampling run
           and latent PSNR against the exact mode on the same seed and inputs; ``cache@0.3`` sets the
           step cache's threshold

Memory variants: ``;``-separated, each a comma list of an offload mode (none | model | sequential), config
files stacked after inference.yaml (e.g. the recipes in configs/tora/memory/), and settings: ``chunk=N``
(VAE encode in N-frame chunks), ``etile=N`` / ``tile=N`` (VAE encode / decode tiles of N latent pixels) or
any ``key=value`` config override.

Results go to stdout (a table last) and, with ``--out DIR``, to DIR/bench.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as sample_video.py
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

import torch  # noqa: E402

from tora import acceleration  # noqa: E402
from tora.checkpoint import init_on_device  # noqa: E402
from tora.config import load_config  # noqa: E402
from tora.diffusion import gaussian_noise  # noqa: E402
from tora.dit import use_compiled_kernels  # noqa: E402
from tora.engine import ToraEngine, build_dit, randomize_  # noqa: E402
from tora.text import FrozenT5Embedder, GeneralConditioner, write_tiny_t5  # noqa: E402
from tora.vae import VideoAutoencoder  # noqa: E402



def cfg_step_flops(params, latent_frames: int, text_length: int, motion: bool = True) -> float:
    """FLOPs of one CFG step (batch 2) as the official code computes it: linears 24 B S D^2 and attention
    4 B S^2 D per layer, AdaLN, embeddings, final layer; with motion also every layer's gamma/beta convs
    and the trajectory extractor (recomputed per step officially).  Full size: 7.13e14 (6.64e14 without
    motion), the reference figures of the performance issue."""
    b, d, p = 2, params.hidden_size, params.patch_size
    h, w = params.latent_height // p, params.latent_width // p
    n = latent_frames * h * w
    s = text_length + n
    text_width = params.modules.patch_embed_config.params.text_hidden_size
    per_layer = 24 * b * s * d * d + 4 * b * s * s * d + 2 * b * params.time_embed_dim * 12 * d
    flops = params.num_layers * per_layer + 2 * b * n * d * params.in_channels * p * p \
        + 2 * b * n * d * params.out_channels * p * p + 2 * b * text_length * text_width * d
    if motion:
        c = params.traj_extractor.channels
        fuser = 2 * (2 * b * n * (d // 4) * c * 9) + 2 * (2 * b * n * d * (d // 4) * 3)
        levels = params.num_layers * params.traj_extractor.num_res_blocks
        extractor = 2 * b * n * (16 * p * p * c * 9 + levels * 2 * c * c * 9)
        flops += params.num_layers * fuser + extractor
    return float(flops)


T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
TRAJECTORY = REPO / "trajs" / "spiral.txt"


# ----------------------------------------------------------------------------------------------
# Building random-weight components
# ----------------------------------------------------------------------------------------------

def make_config(tiny: bool, overrides=(), extra_files=()):
    """Model config + inference.yaml (+ ``extra_files``, e.g. a memory recipe) + ``overrides``."""
    files = [REPO / "configs/tora/model" / ("tora_tiny.yaml" if tiny else "cogvideox_5b_tora.yaml"),
             REPO / "configs/tora/inference.yaml", *extra_files]
    return load_config(files, list(overrides))


def random_t5(cfg, device, dtype, tiny: bool, workdir: Path) -> GeneralConditioner:
    """A T5 encoder of the configured width with random weights (XXL at full size), tiny tokenizer."""
    from transformers import T5Config, T5EncoderModel
    folder = write_tiny_t5(workdir / "t5", d_model=cfg.model.network_config.params.modules.patch_embed_config
                           .params.text_hidden_size)
    embedder = FrozenT5Embedder.from_folder(folder, max_length=cfg.model.conditioner_config.params
                                            .emb_models[0].params.max_length, dtype=dtype)
    if not tiny:
        with init_on_device("meta"):
            model = T5EncoderModel(T5Config(**T5_XXL))
        model = model.to_empty(device=device).to(dtype)
        randomize_(model, seed=1)
        embedder.transformer = model.eval().requires_grad_(False)
    return GeneralConditioner(embedder)


def build_engine(cfg, device, dtype, tiny: bool, workdir: Path, offload: str) -> ToraEngine:
    """Random weights are drawn on the device (fast); the engine then places them per ``offload``."""
    dit = build_dit(cfg, load=None, device=device, dtype=dtype)
    vae = VideoAutoencoder(cfg.model.first_stage_config.params).to(device, dtype)
    text = random_t5(cfg, device, dtype, tiny, workdir)
    return ToraEngine(cfg, dit, vae, text, device, offload)


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int, warmup: int) -> list[float]:
    """Seconds per call (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def peak_gib(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (x.float() - reference.float()).pow(2).mean().item()
    peak = reference.float().abs().max().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------

def phase_matmul(device, dtype, tiny):
    n = 1024 if tiny else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(timed(lambda: a @ b, device, repeat=10, warmup=3))
    return {"matmul_tflops": 2 * n ** 3 / seconds / 1e12}


class StepInputs:
    """Inputs of one CFG denoising call at full resolution (random, fixed seed)."""

    def __init__(self, engine: ToraEngine, seed: int = 0):
        g = torch.Generator(engine.device).manual_seed(seed)
        p = engine.cfg.model.network_config.params
        t, (h, w) = engine.max_latent_frames, engine.latent_size_hw
        text_width = p.modules.patch_embed_config.params.text_hidden_size
        text_len = engine.cfg.model.conditioner_config.params.emb_models[0].params.max_length
        self.x = torch.randn(2, t, 16, h, w, generator=g, device=engine.device)
        self.timesteps = torch.full((2,), 500.0, device=engine.device)
        self.context = torch.randn(2, text_len, text_width, generator=g, device=engine.device)
        self.motion_latents = torch.randn(2, t, 16, h, w, generator=g, device=engine.device)


def phase_step(engine: ToraEngine, matmul_tflops: float | None, repeat: int, backends):
    rows = []
    flops = cfg_step_flops(engine.cfg.model.network_config.params, engine.max_latent_frames,
                           engine.cfg.model.conditioner_config.params.emb_models[0].params.max_length)
    with engine.dit.on_device() as dit, torch.no_grad():
        inputs = StepInputs(engine)
        motion = dit.prepare_motion(inputs.motion_latents, "modulation")
        for backend in backends:
            def step():
                dit(inputs.x, inputs.timesteps, inputs.context, motion=motion)
            try:
                with acceleration.sdpa_backend(backend):
                    times = timed(step, engine.device, repeat=repeat, warmup=2)
            except RuntimeError as err:  # kernel not available for this device/dtype
                rows.append({"sdpa_backend": backend, "error": str(err).splitlines()[0][:120]})
                continue
            seconds = statistics.median(times)
            row = {"sdpa_backend": backend, "step_s": seconds, "step_min_s": min(times),
                   "flops": flops, "tflops": flops / seconds / 1e12}
            if matmul_tflops:
                floor = flops / (matmul_tflops * 1e12)
                row.update(floor_s=floor, ratio_to_floor=seconds / floor)
            rows.append(row)
    return rows


def phase_profile(engine: ToraEngine, backend: str, top: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with engine.dit.on_device() as dit, torch.no_grad(), acceleration.sdpa_backend(backend):
        inputs = StepInputs(engine)
        motion = dit.prepare_motion(inputs.motion_latents, "modulation")
        dit(inputs.x, inputs.timesteps, inputs.context, motion=motion)
        sync(engine.device)
        with profile(activities=activities) as prof:
            dit(inputs.x, inputs.timesteps, inputs.context, motion=motion)
            sync(engine.device)
    key = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def generate_timed(engine: ToraEngine, seed: int = 0, num_frames=None) -> dict:
    """One video with per-stage wall times (synchronised) and per-stage peak GPU memory (GiB)."""
    device, marks, peaks = engine.device, {}, {}
    original = {name: getattr(engine, name) for name in ("encode_prompt", "motion_latents", "sample_latents",
                                                         "decode")}

    overall = {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}

    def note_overall():  # the stages reset the peak counters: keep the running maximum here
        for key, value in peak_gib(device).items():
            overall[key] = max(overall[key], value)

    def wrap(name):
        def run(*args, **kwargs):
            sync(device)
            if device.type == "cuda":
                note_overall()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = original[name](*args, **kwargs)
            sync(device)
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - t0
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
                note_overall()
            return out
        return run

    for name in original:
        setattr(engine, name, wrap(name))
    try:
        sync(device)
        t0 = time.perf_counter()
        result = engine.generate("a red ball rolls across a wooden table", [TRAJECTORY], seed=seed,
                                 num_frames=num_frames)
        sync(device)
        marks["total"] = time.perf_counter() - t0
    finally:
        for name in original:
            delattr(engine, name)
    marks["trajectory_and_other"] = marks["total"] - sum(v for k, v in marks.items() if k != "total")
    note_overall()
    return {"seconds": marks, "peak_gib_by_stage": peaks, "peak": overall if device.type == "cuda" else {},
            "frames": list(result.frames.shape), "latents": result.latents}


@contextlib.contextmanager
def sampling_steps(engine: ToraEngine, steps: int | None):
    """Temporarily sample with ``steps`` steps (sampler and dynamic-CFG schedule); None = as configured."""
    sampler, guider = engine.sampler, engine.sampler.guider
    saved = sampler.num_steps, getattr(guider, "num_steps", None)
    if steps:
        sampler.num_steps = steps
        if saved[1] is not None:
            guider.num_steps = steps
    try:
        yield
    finally:
        sampler.num_steps = saved[0]
        if saved[1] is not None:
            guider.num_steps = saved[1]


def phase_modes(engine: ToraEngine, modes: list[str], steps: int | None = None) -> list[dict]:
    """Full sampling runs of ``steps`` steps (no T5/VAE) from identical inputs; PSNR of each mode's
    latents vs exact."""
    inputs = StepInputs(engine, seed=1)
    x_T = inputs.x[:1].clone()
    context = inputs.context[:1]
    rows, reference = [], None
    for mode in modes:
        try:
            with sampling_steps(engine, steps):
                rows.append(run_mode(engine, mode, context, x_T, inputs.motion_latents))
        except Exception as err:  # one failing mode (kernel unavailable, compile error) must not end the run
            rows.append({"mode": mode, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
            print("mode failed:", rows[-1], flush=True)
            continue
        if reference is None:
            reference = rows[-1].pop("latents")
        rows[-1]["psnr_db"] = psnr(rows[-1].pop("latents", reference), reference)
    return rows


def run_mode(engine: ToraEngine, mode: str, context, x_T, motion_latents) -> dict:
    """Two sampling runs in ``mode`` (the first includes compilation); the second is timed."""
    settings = {part.split("@")[0] for part in mode.split("+")} - {"exact"}
    threshold = [float(part.split("@")[1]) for part in mode.split("+") if part.startswith("cache@")]
    default_threshold = engine.speed.step_cache.threshold
    engine.speed.compile = "compile" in settings
    engine.speed.step_cache.enabled = "cache" in settings
    engine.speed.step_cache.threshold = threshold[0] if threshold else default_threshold
    use_compiled_kernels(engine.speed.compile)
    dit = engine.dit.module
    restore = None
    if "fp8" in settings:
        restore = {i: (l.attention.query_key_value, l.attention.dense, l.mlp.dense_h_to_4h, l.mlp.dense_4h_to_h)
                   for i, l in enumerate(dit.transformer.layers)}
        acceleration.use_fp8_matmuls(dit)
    noise = torch.Generator(engine.device).manual_seed(7)

    def run():
        return engine.sample_latents(context, x_T, gaussian_noise(noise.manual_seed(7)), motion_latents)
    try:
        t_first = time.perf_counter()
        run()  # includes compilation for compiled modes
        sync(engine.device)
        first_s = time.perf_counter() - t_first
        t0 = time.perf_counter()
        latents = run()
        sync(engine.device)
        seconds = time.perf_counter() - t0
    finally:
        if restore:
            for i, layer in enumerate(dit.transformer.layers):
                (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h,
                 layer.mlp.dense_4h_to_h) = restore[i]
        engine.speed.compile = False
        engine.speed.step_cache.enabled = False
        engine.speed.step_cache.threshold = default_threshold
        use_compiled_kernels(False)
    cache = engine.last_step_cache
    return {"mode": mode, "avg_step_s": seconds / engine.sampler.num_steps, "run_s": seconds,
            "first_run_s": first_s, "latents": latents,
            "skipped_steps": cache.skipped_calls if cache is not None else 0,
            "cache_changes": [round(c, 4) for c in cache.changes] if cache is not None else []}


def phase_e2e(engine: ToraEngine, mode: str, sdpa: str) -> dict:
    """One full video (offload none) in speed mode ``mode`` (exact | compile); a compiled run is
    preceded by a short untimed warm-up video so that compilation is not counted."""
    engine.speed.compile = mode == "compile"
    use_compiled_kernels(engine.speed.compile)
    try:
        if engine.speed.compile:
            t0 = time.perf_counter()
            with sampling_steps(engine, 2):  # compile on a 2-step video
                generate_timed(engine)
            warmup_s = time.perf_counter() - t0
        reset_peak(engine.device)
        run = generate_timed(engine)
    finally:
        engine.speed.compile = False
        use_compiled_kernels(False)
    row = {"mode": mode, **run["seconds"], **run["peak"], "sdpa_backend": sdpa,
           "steps": engine.sampler.num_steps, "peak_gib_by_stage": run["peak_gib_by_stage"]}
    if mode == "compile":
        row["compile_warmup_s"] = warmup_s
    return row


# The default mode, then the shipped recipes for 24 GiB and 8-16 GiB cards (as the README recommends).
DEFAULT_MEMORY_VARIANTS = ("model,model.motion.cache=features;"
                           "configs/tora/memory/24gb.yaml;"
                           "configs/tora/memory/8gb.yaml")
MEMORY_ALIASES = {"chunk": "model.first_stage_config.params.encode_chunk_frames",
                  "etile": "model.first_stage_config.params.encode_tile_latent_size",
                  "tile": "model.first_stage_config.params.decode_tile_latent_size"}
OFFLOADS = ("none", "model", "sequential")


def parse_memory_variant(variant: str) -> tuple[str | None, list[Path], list[str]]:
    """'configs/tora/memory/8gb.yaml,chunk=4' -> (offload or None, [config files], [config overrides]).

    Items: an offload mode (none | model | sequential), a YAML file stacked after inference.yaml
    (relative paths are taken from the repository root), or key=value (aliases: MEMORY_ALIASES).
    Without an offload item the stacked config's ``args.offload`` applies."""
    offload, files, overrides = None, [], []
    for item in (part.strip() for part in variant.split(",") if part.strip()):
        if item in OFFLOADS:
            offload = item
        elif item.endswith((".yaml", ".yml")):
            files.append(Path(item) if Path(item).is_absolute() else REPO / item)
        else:
            key, _, value = item.partition("=")
            overrides.append(f"{MEMORY_ALIASES.get(key, key)}={value}")
    return offload, files, overrides


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--phases", default="matmul,step,profile,e2e,memory")
    parser.add_argument("--modes", default="exact,compile,fp8,cache,compile+fp8+cache")
    parser.add_argument("--compiled-step", action="store_true",
                        help="step and profile phases with the regionally compiled kernels (--compile)")
    parser.add_argument("--modes-steps", type=int, default=None,
                        help="sampling steps of each modes-phase run (default: as configured)")
    parser.add_argument("--e2e-modes", default="exact", help="speed modes of the e2e phase: exact, compile")
    parser.add_argument("--memory", default=DEFAULT_MEMORY_VARIANTS,
                        help="memory variants (see above); default: %(default)s")
    parser.add_argument("--backends", default="auto,cudnn,flash", help="SDPA kernels for the step phase")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench.json")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    phases = args.phases.split(",")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "argv": sys.argv[1:], "size": "tiny" if args.tiny else "full"}
    print(f"# bench_sample on {results['device']}, torch {results['torch']}, {results['size']} size", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_"))
    cfg = make_config(args.tiny, args.overrides)

    if "matmul" in phases:
        results.update(phase_matmul(device, dtype, args.tiny))
        print(f"matmul: {results['matmul_tflops']:.0f} TFLOP/s", flush=True)

    if {"step", "profile", "e2e", "modes"} & set(phases):
        engine = build_engine(cfg, device, dtype, args.tiny, workdir, offload="none")
        use_compiled_kernels(args.compiled_step)  # step/profile phases (the warm-up steps compile)
        results["compiled_step"] = args.compiled_step
        if "step" in phases:
            results["step"] = phase_step(engine, results.get("matmul_tflops"), args.repeat, args.backends.split(","))
            print("step:", json.dumps(results["step"]), flush=True)
        best = min((r for r in results.get("step", []) if "step_s" in r), key=lambda r: r["step_s"],
                   default={"sdpa_backend": args.backends.split(",")[0]})["sdpa_backend"]
        engine.speed.sdpa_backend = best
        if "profile" in phases:
            results["profile"] = phase_profile(engine, best)
            print(results["profile"], flush=True)
        use_compiled_kernels(False)
        if "e2e" in phases:
            results["e2e"] = []
            for mode in args.e2e_modes.split(","):
                results["e2e"].append(phase_e2e(engine, mode, best))
                print("e2e:", json.dumps(results["e2e"][-1]), flush=True)
        if "modes" in phases:
            results["modes"] = phase_modes(engine, args.modes.split(","), args.modes_steps)
            print("modes:", json.dumps(results["modes"]), flush=True)
        del engine
        reset_peak(device)

    if "memory" in phases:
        results["memory"] = []
        for variant in args.memory.split(";"):
            offload, files, extra = parse_memory_variant(variant)
            mcfg = make_config(args.tiny, [*args.overrides, "model.sampler_config.params.num_steps=3", *extra], files)
            offload = offload or mcfg.args.offload
            engine = build_engine(mcfg, device, dtype, args.tiny, workdir, offload=offload)
            reset_peak(device)
            run = generate_timed(engine)
            results["memory"].append({"variant": variant, "offload": offload, **run["peak"],
                                      "peak_gib_by_stage": run["peak_gib_by_stage"], "seconds": run["seconds"]})
            print("memory:", json.dumps(results["memory"][-1]), flush=True)
            del engine
            reset_peak(device)

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(f"\n## {results['device']} | torch {results['torch']} | {results['size']} size")
    if "matmul_tflops" in results:
        print(f"bf16 matmul: {results['matmul_tflops']:.0f} TFLOP/s")
    print("| measurement | value |\n|---|---|")
    for row in results.get("step", []):
        if "step_s" in row:
            floor = f", {row['ratio_to_floor']:.2f}x floor" if "ratio_to_floor" in row else ""
            kind = "compiled" if results.get("compiled_step") else "exact"
            print(f"| CFG step, {kind}, sdpa={row['sdpa_backend']} | {row['step_s']:.3f} s ({row['tflops']:.0f} TFLOP/s{floor}) |")
        else:
            print(f"| CFG step, sdpa={row['sdpa_backend']} | unavailable: {row['error']} |")
    for e in results.get("e2e", []):
        print(f"| one {e['steps']}-step video, {e['mode']}, offload none | {e['total']:.1f} s "
              f"(T5 {e.get('encode_prompt', 0):.1f}, motion {e.get('motion_latents', 0):.1f}, "
              f"sampling {e.get('sample_latents', 0):.1f}, decode {e.get('decode', 0):.1f}, "
              f"other {e['trajectory_and_other']:.1f}) |")
        if "peak_allocated_gib" in e:
            print(f"| peak memory, {e['mode']}, offload none | {e['peak_allocated_gib']:.1f} GiB allocated, "
                  f"{e['peak_reserved_gib']:.1f} GiB reserved |")
    for m in results.get("memory", []):
        if "peak_allocated_gib" in m:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in m["peak_gib_by_stage"].items())
            print(f"| peak memory, {m['variant']} | {m['peak_allocated_gib']:.1f} GiB allocated, "
                  f"{m['peak_reserved_gib']:.1f} GiB reserved; by stage: {stages} ({m['seconds']['total']:.0f} s, "
                  f"3 steps) |")
    for m in results.get("modes", []):
        if "error" in m:
            print(f"| mode {m['mode']} | failed: {m['error']} |")
            continue
        print(f"| mode {m['mode']} | {m['avg_step_s']:.3f} s/step avg, PSNR {m['psnr_db']:.1f} dB, "
              f"{m['skipped_steps']} steps skipped (first run {m['first_run_s']:.0f} s) |")


if __name__ == "__main__":
    main()
