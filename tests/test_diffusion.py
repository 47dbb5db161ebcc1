"""Diffusion math (tora.diffusion): schedule, denoiser, guidance, sampler, loss, config wiring."""
import math
from pathlib import Path

import pytest
import torch

from tora.config import ConfigError, load_config
from tora.diffusion import (DiscreteDenoiser, DiscreteSampling, DynamicCFG, VanillaCFG, VideoDiffusionLoss,
                            VPSDEDPMPP2MSampler, ZeroSNRDDPMDiscretization, conditioned_network,
                            gaussian_noise, rank_index_range)

REPO = Path(__file__).resolve().parents[1]


def build(overrides=(), files=()):
    """(denoiser, sampler, loss) from the schema defaults (the official values) plus overrides."""
    model = load_config(list(files), list(overrides)).model
    denoiser = DiscreteDenoiser.from_config(model.denoiser_config)
    return (denoiser, VPSDEDPMPP2MSampler.from_config(model.sampler_config, denoiser),
            VideoDiffusionLoss.from_config(model.loss_fn_config, denoiser))


# -- schedule ------------------------------------------------------------------------------------

def test_table_end_points_and_order():
    table = ZeroSNRDDPMDiscretization().table()
    assert table.shape == (1000,) and table.dtype == torch.float32
    assert table[999] == 0.0  # zero terminal SNR: pure noise at t = 999
    assert table[0] == pytest.approx(0.99957, abs=1e-5)  # sqrt(1 - beta_0), unchanged by the rescale
    assert (table[1:] < table[:-1]).all()


def test_sampler_schedule_uses_the_rescaled_subset():
    _, sampler, _ = build()
    timesteps, alphas = sampler.schedule()
    assert timesteps[:3].tolist() == [999, 979, 959] and timesteps[-1] == 19 and len(timesteps) == 50
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and len(alphas) == 51
    table = ZeroSNRDDPMDiscretization().table()
    assert alphas[-2] == pytest.approx(0.99108, abs=1e-5)  # t = 19, rescaled over the 50-step subset
    assert table[19] == pytest.approx(0.99046, abs=1e-5)
    assert sampler.denoiser.sigma_to_idx(alphas[-2:-1]).item() == 18  # the denoiser snaps to t - 1


def test_full_subset_is_every_timestep():
    disc = ZeroSNRDDPMDiscretization()
    assert torch.equal(disc.timesteps(1000), torch.arange(1000))
    with pytest.raises(ValueError, match="2 <= number of timesteps <= 1000"):
        disc(1001)


def test_snr_shift_lowers_the_signal_scale():
    plain, shifted = ZeroSNRDDPMDiscretization().table(), ZeroSNRDDPMDiscretization(shift_scale=3.0).table()
    assert (shifted[1:-1] < plain[1:-1]).all() and shifted[-1] == 0.0


# -- denoiser ------------------------------------------------------------------------------------

def test_denoiser_is_x0_from_v_prediction_with_quantised_alpha():
    denoiser = DiscreteDenoiser(ZeroSNRDDPMDiscretization())
    seen = {}

    def model(x, c_noise, cond, **kw):
        seen.update(c_noise=c_noise, kw=kw)
        return torch.full_like(x, 0.5)

    x = torch.randn(2, 1, 4, 2, 2)
    a = torch.tensor([0.30001, 0.9])
    idx = torch.tensor([123.0, 7.0])
    denoised = denoiser(model, x, a, idx, {"crossattn": torch.zeros(2, 1, 1)}, video_flow="passed")
    a_q = denoiser.quantize(a)
    assert a_q[0] != a[0] and (a_q - a).abs().max() < 1e-3  # snapped to a table entry
    expected = a_q.view(2, 1, 1, 1, 1) * x - (1 - a_q ** 2).sqrt().view(2, 1, 1, 1, 1) * 0.5
    torch.testing.assert_close(denoised, expected)
    assert torch.equal(seen["c_noise"], idx) and seen["kw"] == {"video_flow": "passed"}  # idx as passed


def test_quantisation_picks_the_nearest_entry():
    denoiser = DiscreteDenoiser(ZeroSNRDDPMDiscretization())
    table = denoiser.alphas_cumprod_sqrt
    assert torch.equal(denoiser.sigma_to_idx(table), torch.arange(1000))
    near_500 = table[500] + 0.2 * (table[499] - table[500])
    assert denoiser.sigma_to_idx(near_500[None]).item() == 500


# -- guidance ------------------------------------------------------------------------------------

def test_dynamic_cfg_timestep_input_reproduces_the_official_wave():
    guider = DynamicCFG(6, 5, 50)
    _, sampler, _ = build()
    scales = [guider.scale_at(i, int(t), 50) for i, t in enumerate(sampler.schedule().timesteps)]
    assert [round(s, 3) for s in scales[:3]] == [2.291, 2.544, 6.974]  # spec 4.3
    assert [round(s, 3) for s in scales[-3:]] == [1.0, 1.0, 1.123]


def test_dynamic_cfg_step_index_input_rises_smoothly():
    guider = DynamicCFG(6, 5, 50, step_input="step_index")
    scales = [guider.scale_at(i, 999 - 20 * i, 50) for i in range(50)]
    assert scales[0] == 1.0 and scales[-1] < 7.0
    assert all(b >= a for a, b in zip(scales, scales[1:]))


def test_cfg_batch_is_uncond_then_cond_and_kwargs_pass_through():
    _, sampler, _ = build(["model.sampler_config.params.num_steps=3",
                           "model.sampler_config.params.guider_config.target=tora.diffusion.VanillaCFG",
                           "model.sampler_config.params.guider_config.params.scale=4"])
    calls = []
    flow = torch.randn(2, 1, 4, 2, 2)

    def model(x, c_noise, cond, video_flow):
        calls.append((x, c_noise, cond, video_flow))
        return cond["crossattn"].mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * torch.ones_like(x)

    cond = {"crossattn": torch.ones(1, 2, 3), "concat": torch.full((1, 1, 4, 2, 2), 2.0)}
    uncond = {"crossattn": torch.zeros(1, 2, 3), "concat": torch.full((1, 1, 4, 2, 2), 3.0)}
    record = {}
    sampler(model, torch.randn(1, 1, 4, 2, 2), cond, uncond, record=record, video_flow=flow)
    x_in, c_noise, cond_in, video_flow = calls[0]
    assert len(calls) == 3 and x_in.shape[0] == 2 and torch.equal(x_in[0], x_in[1])
    assert cond_in["crossattn"][:, 0, 0].tolist() == [0.0, 1.0]  # [uncond; cond]
    assert cond_in["concat"][:, 0, 0, 0, 0].tolist() == [3.0, 2.0]
    assert video_flow is flow and c_noise.tolist() == [999.0, 999.0]
    # step 0 has a = 0, so D = -v: D_u = 0, D_c = -1 -> guided -4 with the constant scale 4
    assert record["step_cfg_scale"].tolist() == [4.0, 4.0, 4.0]
    assert torch.allclose(record["step_denoised"][0], torch.tensor(-4.0))


def test_cond_and_uncond_must_match():
    with pytest.raises(ValueError, match="same keys"):
        VanillaCFG.batch(torch.zeros(1), {"crossattn": torch.zeros(1), "concat": torch.zeros(1)},
                         {"crossattn": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown conditioning keys \\['vector'\\]"):
        network = conditioned_network(torch.nn.Identity())
        network(torch.zeros(1), torch.zeros(1), {"crossattn": torch.zeros(1), "vector": torch.zeros(1)})


# -- sampler -------------------------------------------------------------------------------------

def gaussian_posterior_model(sampler, mean, std):
    """v-prediction that makes the denoiser return E[x_0 | x_t] for x_0 ~ N(mean, std^2) exactly."""
    timesteps, alphas = sampler.schedule()
    alpha_of = dict(zip(timesteps.tolist(), alphas.tolist()))

    def model(x, c_noise, cond):
        a = torch.tensor([alpha_of[int(t)] for t in c_noise]).view(-1, 1, 1, 1, 1)
        a_q = sampler.denoiser.quantize(a.flatten()).view(-1, 1, 1, 1, 1)
        posterior_mean = mean + a * std ** 2 * (x - a * mean) / (a ** 2 * std ** 2 + 1 - a ** 2)
        return (a_q * x - posterior_mean) / (1 - a_q ** 2).sqrt()
    return model


@pytest.mark.parametrize("draw_discarded_noise", [True, False])
def test_sampler_with_exact_denoiser_samples_the_data_distribution(draw_discarded_noise):
    _, sampler, _ = build(["model.sampler_config.params.num_steps=200",
                           f"model.sampler_config.params.draw_discarded_noise={draw_discarded_noise}"])
    mean, std = 1.5, 0.5
    model = gaussian_posterior_model(sampler, mean, std)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 1, 16, 64, 64, generator=generator)
    context = {"crossattn": torch.zeros(1, 1, 1)}
    samples = sampler(model, x_T, context, context, noise_fn=gaussian_noise(generator))
    # The last step returns E[x_0 | x_t] at the cleanest a (not a draw of x_0), whose spread is
    # std * sqrt(SNR / (SNR + 1)) with SNR = a^2 std^2 / (1 - a^2); a first-order solver, a wrong
    # second-order term or mis-scaled noise miss it by 3 % or more.
    a = sampler.schedule().alphas[-2].item()
    snr = a ** 2 * std ** 2 / (1 - a ** 2)
    assert samples.mean().item() == pytest.approx(mean, abs=0.01)
    assert samples.std().item() == pytest.approx(std * (snr / (snr + 1)) ** 0.5, rel=0.015)


def test_random_draw_pattern_and_records():
    shape = (1, 2, 4, 2, 2)
    context = {"crossattn": torch.zeros(1, 1, 1)}
    for flag, draws in (("true", 2 * 6 - 3), ("false", 6 - 1)):
        _, sampler, _ = build(["model.sampler_config.params.num_steps=6",
                               f"model.sampler_config.params.draw_discarded_noise={flag}"])
        drawn, steps, record = [], [], {}

        def noise_fn(like):
            drawn.append(like.shape)
            return torch.zeros_like(like)
        sampler(lambda x, t, c: torch.zeros_like(x), torch.randn(shape), context, context,
                noise_fn=noise_fn, callback=steps.append, record=record)
        assert len(drawn) == draws and steps == list(range(6))
    assert record["step_x"].shape == (6, *shape) and record["step_denoised"].shape == (6, *shape)
    assert record["step_timesteps"][0] == 999 and record["step_next_alpha"][-1] == 1.0
    assert torch.equal(record["step_x"][-1], record["step_denoised"][-1])  # last step returns D


def test_seeded_sampling_is_reproducible():
    _, sampler, _ = build(["model.sampler_config.params.num_steps=4"])
    context = {"crossattn": torch.zeros(1, 1, 1)}

    def run(seed):
        return sampler(lambda x, t, c: 0.1 * x, torch.ones(1, 1, 2, 2, 2), context, context,
                       noise_fn=gaussian_noise(torch.Generator().manual_seed(seed)))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


# -- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size, expected", [
    (1, [(0, 1000)]),
    (2, [(0, 500), (500, 1000)]),
    (3, [(0, 1000)] * 3),  # 3 does not divide 1000: one group
    (8, [(125 * r, 125 * (r + 1)) for r in range(8)]),
    (16, [(125 * (r // 2), 125 * (r // 2 + 1)) for r in range(16)]),  # G = 8, two ranks per block
])
def test_uniform_sampling_rank_groups(world_size, expected):
    assert [rank_index_range(1000, r, world_size) for r in range(world_size)] == expected


def test_discrete_sampling_draws_from_the_rank_block():
    sampling = DiscreteSampling(ZeroSNRDDPMDiscretization(), uniform_sampling=True, rank=3, world_size=8)
    a, idx = sampling(500, torch.Generator().manual_seed(0))
    assert idx.min() >= 375 and idx.max() < 500 and torch.equal(a, sampling.alphas_cumprod_sqrt[idx])
    with pytest.raises(ValueError, match="rank 8 is outside 0..7"):
        rank_index_range(1000, 8, 8)


class LinearV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, timesteps, context, concat=None):
        return self.weight * x + timesteps.float().view(-1, 1, 1, 1, 1) / 1000


def test_loss_is_v_mse_and_gradients_flow():
    _, _, loss_fn = build()
    net = LinearV()
    x0 = torch.randn(3, 2, 4, 2, 2)
    record = {}
    loss = loss_fn(conditioned_network(net), x0, {"crossattn": torch.zeros(3, 1, 1)},
                   generator=torch.Generator().manual_seed(1), record=record)
    assert loss.shape == (3,)
    a = record["alphas_cumprod_sqrt"].view(-1, 1, 1, 1, 1)
    v_target = a * record["noise"] - (1 - a ** 2).sqrt() * x0
    v_hat = net(record["noised_input"], record["idx"], None)
    torch.testing.assert_close(loss, ((v_hat - v_target) ** 2).flatten(1).mean(1), rtol=1e-3, atol=1e-5)
    loss.mean().backward()
    assert net.weight.grad is not None and net.weight.grad != 0


def test_offset_noise_adds_one_constant_per_sample():
    _, _, loss_fn = build(["model.loss_fn_config.params.offset_noise_level=0.1"])
    x0, noise = torch.randn(2, 1, 4, 2, 2), torch.randn(2, 1, 4, 2, 2)
    record = {}
    loss_fn(conditioned_network(LinearV()), x0, {"crossattn": torch.zeros(2, 1, 1)},
            idx=torch.tensor([10, 900]), noise=noise, record=record)
    offset = (record["noise"] - noise).flatten(1)
    assert (offset.std(dim=1) < 1e-6).all() and (offset[:, 0].abs() > 0).all()
    assert record["idx"].tolist() == [10, 900]


# -- configuration -------------------------------------------------------------------------------

def test_official_yaml_builds_the_official_pieces():
    denoiser, sampler, loss_fn = build(files=[REPO / "configs/tora/model/cogvideox_5b_tora.yaml"])
    assert isinstance(sampler.guider, DynamicCFG) and sampler.guider.step_input == "timestep"
    assert sampler.num_steps == 50 and sampler.draw_discarded_noise
    assert denoiser.num_idx == 1000 and loss_fn.offset_noise_level == 0
    assert (loss_fn.sigma_sampler.low, loss_fn.sigma_sampler.high) == (0, 1000)


@pytest.mark.parametrize("override, message", [
    ("model.sampler_config.params.num_steps=1",
     "'model.sampler_config.params.num_steps' = 1 must be in 2..1000"),
    ("model.sampler_config.params.guider_config.params.exp=5.5",
     "'model.sampler_config.params.guider_config.params.exp' = 5.5 must be an integer"),
    ("model.denoiser_config.params.quantize_c_noise=true", "'model.denoiser_config.params.quantize_c_noise'"),
    ("model.denoiser_config.params.num_idx=2000", "'model.denoiser_config.params.num_idx' = 2000"),
    ("model.loss_fn_config.params.sigma_sampler_config.params.discretization_config.params.shift_scale=0",
     "'model.loss_fn_config.params.sigma_sampler_config.params.discretization_config.params.shift_scale'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(".", "\\.")):
        build([override])


def test_non_integer_exp_is_fine_with_the_step_index():
    _, sampler, _ = build(["model.sampler_config.params.guider_config.params.exp=2.5",
                           "model.sampler_config.params.guider_config.params.step_input=step_index"])
    expected = 1 + 6 * (1 - math.cos(math.pi * (10 / 50) ** 2.5)) / 2
    assert sampler.guider.scale_at(10, 0, 50) == pytest.approx(expected)
