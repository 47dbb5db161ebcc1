"""Golden runners: the DiT, the trajectory extractor and the motion-guidance fuser."""
from einops import rearrange
import torch

from tora.checkpoint import load_dit_checkpoint, load_state_dict, resolve_checkpoint
from tora.config import network_params_from
from tora.dit import DiffusionTransformer, MotionGuidanceFuser, TrajExtractor

from . import GoldenCase, runner


def load_dit(case: GoldenCase, name: str) -> DiffusionTransformer:
    entry = case.checkpoint(name)
    model = DiffusionTransformer(network_params_from(entry["network_config"]["params"], name))
    load_dit_checkpoint(model, case.path(entry["path"]))  # the project's own loader, strict
    return model.eval()


@runner("dit_*")
def run_dit(case: GoldenCase) -> dict:
    inputs = case.inputs
    model = load_dit(case, case.entry["weights"])
    record = {}
    with torch.no_grad():
        out = model(inputs["x"], inputs["timesteps"], inputs["context"],
                    video_flow=inputs.get("video_flow"), concat=inputs.get("concat"), record=record)
    outputs = {"out": out}
    hw = model.patch_grid
    for key, value in record.items():
        if key.endswith("_mgf_out"):  # [B, T*h*w, D] -> (b t) D h w
            value = rearrange(value, "b (t h w) d -> (b t) d h w", h=hw[0], w=hw[1])
        outputs[key] = value
    if "video_flow" in inputs:
        outputs["traj_features"] = model.prepare_motion(inputs["video_flow"], "features")["motion_features"]
    return {k: v for k, v in outputs.items() if k in case.entry["outputs"]}


def _sub_state(case: GoldenCase, prefix: str) -> dict:
    file, _ = resolve_checkpoint(case.path(case.checkpoint(case.entry["weights"])["path"]))
    return {k[len(prefix):]: v for k, v in load_state_dict(file).items() if k.startswith(prefix)}


@runner("traj_extractor*")
def run_traj_extractor(case: GoldenCase) -> dict:
    c = case.params["constructor"]
    extractor = TrajExtractor(num_levels=len(c["channels"]), channels=c["channels"][0],
                              num_res_blocks=c["nums_rb"], latent_channels=c["cin"],
                              downscale=c["patch_size"])
    extractor.load_state_dict(_sub_state(case, case.params["weights_prefix"]), strict=True)
    with torch.no_grad():
        return {"features": extractor.eval()(case.inputs["video_flow_bcthw"])}


@runner("mgf*")
def run_mgf(case: GoldenCase) -> dict:
    c = case.params["constructor"]
    fuser = MotionGuidanceFuser(c["flow_in_channel"], c["out_channels"])
    fuser.load_state_dict(_sub_state(case, case.params["weights_prefix"]), strict=True)
    frames = case.params["T"]
    h, flow = case.inputs["h"], case.inputs["flow"]
    hh, ww = h.shape[-2:]
    tokens = rearrange(h, "(b t) d h w -> b (t h w) d", t=frames)
    with torch.no_grad():
        gamma, beta = fuser.modulation(flow, frames)
        out = fuser(tokens, frames, gamma, beta)
    return {"out": rearrange(out, "b (t h w) d -> (b t) d h w", t=frames, h=hh, w=ww)}
