"""Golden runners: the 3-D causal VAE (encode with the recorded posterior draw; one-call and chunked decode)."""
from tora.vae import VideoAutoencoder, first_stage_params_from, load_vae

from . import GoldenCase, runner


def build_vae(case: GoldenCase) -> VideoAutoencoder:
    """The checkpoint's official config and ``3d-vae.pt``, through the loader users take."""
    entry = case.checkpoint(case.entry["weights"])
    params = first_stage_params_from(entry["config"], f"manifest.json checkpoints.{case.entry['weights']}.config")
    return load_vae(params, case.path(entry["path"]))


@runner("vae_encode*")
def run_encode(case: GoldenCase) -> dict:
    posterior = build_vae(case).encode(case.inputs["video"])
    z = posterior.sample(eps=case.inputs["eps"])
    return {"moments": posterior.moments, "mean": posterior.mean, "logvar": posterior.logvar, "z": z,
            "z_scaled": case.params["scale_factor"] * z}


@runner("vae_decode*")
def run_decode(case: GoldenCase) -> dict:
    vae, z = build_vae(case), case.inputs["z"]
    spans = [tuple(span) for span in case.params["chunk_latent_spans"]]
    return {"decoded_full": vae.decode(z, spans=[(0, z.shape[2])]), "decoded_chunked": vae.decode(z, spans=spans)}
