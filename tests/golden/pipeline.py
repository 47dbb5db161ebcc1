"""Golden runners: end-to-end sampling (trajectory -> VAE -> sampler with the DiT -> decode)."""
import torch

from tora.config import load_config
from tora.dit import DiffusionTransformer
from tora.engine import ToraEngine
from tora.vae import load_vae
from tora.checkpoint import load_dit_checkpoint

from . import GoldenCase, runner


def replay(case: GoldenCase):
    """noise_fn that hands out the recorded draws in order, checking each shape."""
    draws = iter(case.params["noise_draws"])

    def noise_fn(like):
        spec = next(draws)
        noise = case.inputs[spec["key"]]
        assert tuple(noise.shape) == tuple(like.shape), f"draw {spec['key']} ({spec['label']}): " \
            f"recorded {tuple(noise.shape)}, engine asked for {tuple(like.shape)}"
        return noise.to(like.device, like.dtype)
    return noise_fn, draws


def pipeline_engine(case: GoldenCase) -> ToraEngine:
    p = case.params
    dit_name = next(w for w in case.entry["weights"] if w.startswith("dit"))
    dit_entry, vae_entry = case.checkpoint(dit_name), case.checkpoint("vae")
    overrides = {"trajectory": {"resample": "official"}, "model": {
        "scale_factor": p["scale_factor"],
        "network_config": {"params": dit_entry["network_config"]["params"]},
        "first_stage_config": {"params": vae_entry["config"]["params"]},
        "sampler_config": {"params": {"num_steps": p["sampler_steps"], "guider_config": {"params": p["cfg"]}}},
    }}
    cfg = load_config(extra=overrides)
    cfg.model.first_stage_config.params.ckpt_path = str(case.path(vae_entry["path"]))
    dit = DiffusionTransformer(cfg.model.network_config.params)
    load_dit_checkpoint(dit, case.path(dit_entry["path"]))
    return ToraEngine(cfg, dit, load_vae(cfg.model.first_stage_config.params), None, torch.device("cpu"))


@runner("pipeline_*")
def run_pipeline(case: GoldenCase) -> dict:
    p = case.params
    engine = pipeline_engine(case)
    assert tuple(p["video_size_hw"]) == engine.video_size_hw
    noise_fn, remaining = replay(case)
    image = None
    if "image_u8" in case.inputs:
        image = case.inputs["image_u8"][None].float() / 255 * 2 - 1
    record = {}
    result = engine.generate(
        context=case.inputs["context"], trajectory_files=[case.path(f) for f in p["trajectory_files"]],
        image=image, num_frames=p["video_frames"], noise_fn=noise_fn, record=record,
        decode_spans=[tuple(span) for span in p["decode_chunk_latent_spans"]])
    assert next(remaining, None) is None, "the engine drew fewer random tensors than the reference"
    outputs = dict(record, samples_z=result.latents.permute(0, 2, 1, 3, 4))
    return {k: v for k, v in outputs.items() if k in case.entry["outputs"]}
