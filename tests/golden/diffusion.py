"""Golden runners: schedule, denoiser, guidance, sampler and training loss (tora.diffusion).

Every piece is built through its ``from_config`` from the schema defaults (the official values)
with the case's parameters merged in, so the runners also check the config wiring.
"""
import torch

from tora.config import merge, schema
from tora.diffusion import (DiscreteDenoiser, DynamicCFG, VideoDiffusionLoss, VPSDEDPMPP2MSampler,
                            ZeroSNRDDPMDiscretization, conditioned_network)

from . import GoldenCase, runner
from .dit import load_dit


def model_config(case: GoldenCase, overrides: dict):
    return merge(schema(), {"model": overrides}, f"golden case {case.name}").model


def build_sampler(cfg) -> VPSDEDPMPP2MSampler:
    denoiser = DiscreteDenoiser.from_config(cfg.denoiser_config)
    return VPSDEDPMPP2MSampler.from_config(cfg.sampler_config, denoiser)


def shifted(shift_scale: float) -> dict:
    return {"discretization_config": {"params": {"shift_scale": shift_scale}}}


class StandIn(torch.nn.Module):
    """The README's fixed map: out = W x (over channels) + (t / 1000) u + mean(context) v."""

    def __init__(self, inputs: dict):
        super().__init__()
        self.W, self.u, self.v = inputs["standin_W"], inputs["standin_u"], inputs["standin_v"]

    def forward(self, x, timesteps, context, concat=None, **ignored):  # x: b t c h w
        assert concat is None, "the stand-in cases use no concat"
        out = torch.einsum("oc,btchw->btohw", self.W, x)
        bias = (timesteps.float() / 1000)[:, None] * self.u + context.mean(dim=(1, 2))[:, None] * self.v
        return out + bias[:, None, :, None, None]


def replay(case: GoldenCase):
    """noise_fn returning the recorded draws in call order; ``check()`` asserts all were used."""
    draws = iter([case.inputs[d["key"]] for d in case.params["noise_draws"]])

    def noise_fn(like):
        draw = next(draws)
        assert draw.shape == like.shape, f"recorded draw {tuple(draw.shape)} != requested {tuple(like.shape)}"
        return draw
    noise_fn.check = lambda: next(draws, None) is None
    return noise_fn


@runner("zero_snr_sigmas*")
def run_zero_snr_sigmas(case: GoldenCase) -> dict:
    out = {}
    for shift in case.params["shifts"]:
        cfg = model_config(case, {"sampler_config": {"params": shifted(shift)}})
        disc = ZeroSNRDDPMDiscretization.from_config(cfg.sampler_config.params.discretization_config)
        out[f"shift{shift}_table{disc.num_timesteps}"] = disc.table()
        for n in case.params["ns"]:
            alphas, timesteps = disc(n)
            noisiest_first = alphas.flip(0)
            out[f"shift{shift}_n{n}_default"] = torch.cat([noisiest_first, alphas.new_zeros(1)])
            out[f"shift{shift}_n{n}_video_sampler"] = noisiest_first
            out[f"shift{shift}_n{n}_timesteps"] = timesteps
    return out


@runner("denoiser_scalings*")
def run_denoiser_scalings(case: GoldenCase) -> dict:
    inputs = case.inputs
    cfg = model_config(case, {"denoiser_config": {"params": shifted(case.params["shift_scale"])}})
    denoiser = DiscreteDenoiser.from_config(cfg.denoiser_config)
    sigma, idx = inputs["sigma"], inputs["idx"]
    c_skip, c_out, c_in, c_noise = denoiser.scalings(sigma, idx)
    model = conditioned_network(StandIn(inputs))
    return {f"table{denoiser.num_idx}": denoiser.alphas_cumprod_sqrt,
            "sigma_to_idx": denoiser.sigma_to_idx(sigma), "quantized_sigma": denoiser.quantize(sigma),
            "c_skip": c_skip, "c_out": c_out, "c_in": c_in, "c_noise": c_noise,
            "denoised": denoiser(model, inputs["x"], sigma, idx, {"crossattn": inputs["context"]})}


@runner("dynamic_cfg*")
def run_dynamic_cfg(case: GoldenCase) -> dict:
    out = {}
    guiders = []
    for i, c in enumerate(case.params["configs"]):
        cfg = model_config(case, {"sampler_config": {"params": {
            "num_steps": c["num_steps"], "guider_config": {"params": c}}}})
        sampler = build_sampler(cfg)
        guider = sampler.guider
        assert isinstance(guider, DynamicCFG)
        guiders.append(guider)
        timesteps = [int(t) for t in sampler.schedule().timesteps]
        k_passed = [guider.schedule_input(step, t, sampler.num_steps) for step, t in enumerate(timesteps)]
        out[f"cfg{i}_scale_at_step_index"] = torch.tensor(
            [guider.schedule(k) for k in range(guider.num_steps + 1)], dtype=torch.float64)
        out[f"cfg{i}_sampler_step_index"] = torch.tensor(k_passed)
        scales_used = [guider.scale_at(step, t, sampler.num_steps) for step, t in enumerate(timesteps)]
        out[f"cfg{i}_scale_used_by_sampler"] = torch.tensor(scales_used, dtype=torch.float64)
    scale = guiders[0].schedule(case.params["combine_example_step_index"])
    out["combine_example"] = guiders[0].combine(case.inputs["combine_example_input"], scale)
    return out


@runner("sampler_standin*")
def run_sampler_standin(case: GoldenCase) -> dict:
    p, inputs = case.params, case.inputs
    cfg = model_config(case, {
        "denoiser_config": {"params": shifted(p["shift_scale"])},
        "sampler_config": {"params": {
            "num_steps": p["num_steps"], **shifted(p["shift_scale"]),
            "guider_config": {"params": {"scale": p["cfg_scale"], "exp": p["cfg_exp"],
                                         "num_steps": p["cfg_num_steps"]}}}}})
    sampler = build_sampler(cfg)
    noise_fn, record, steps_done = replay(case), {}, []
    samples = sampler(conditioned_network(StandIn(inputs)), inputs["x_T"],
                      {"crossattn": inputs["cond_context"]}, {"crossattn": inputs["uncond_context"]},
                      noise_fn=noise_fn, callback=steps_done.append, record=record,
                      video_flow=inputs["video_flow"])
    assert noise_fn.check(), "the sampler drew fewer Gaussians than the official code"
    assert steps_done == list(range(p["num_steps"]))
    return {"samples": samples, **record}


def run_loss(case: GoldenCase, network: torch.nn.Module) -> dict:
    inputs = case.inputs
    cfg = model_config(case, {})
    loss_fn = VideoDiffusionLoss.from_config(cfg.loss_fn_config,
                                             DiscreteDenoiser.from_config(cfg.denoiser_config))
    record = {}
    with torch.no_grad():
        loss = loss_fn(conditioned_network(network), inputs["x0"], {"crossattn": inputs["context"]},
                       idx=inputs["idx"], noise=inputs["noise"], record=record,
                       video_flow=inputs["video_flow"])
    return {"loss": loss, **{k: v for k, v in record.items() if k in case.entry["outputs"]}}


@runner("diffusion_loss_standin*")
def run_diffusion_loss_standin(case: GoldenCase) -> dict:
    return run_loss(case, StandIn(case.inputs))


@runner("diffusion_loss_dit*")
def run_diffusion_loss_dit(case: GoldenCase) -> dict:
    return run_loss(case, load_dit(case, case.entry["weights"]))
