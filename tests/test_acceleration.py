"""Speed/memory modes: each one either computes the same function (streaming, CFG parallel, compile)
or stays close to it by a measured margin (fp8, step cache)."""
import re

import pytest
import torch

from tora import acceleration
from tora.config import network_params_from
from tora.dit import DiffusionTransformer, use_compiled_kernels

from test_dit import TINY, tiny_inputs


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = DiffusionTransformer(network_params_from(TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def psnr(a, b):
    return 10 * torch.log10(b.abs().max() ** 2 / (a - b).pow(2).mean()).item()


def test_layer_groups_hold_exactly_the_per_layer_weights(dit):
    grouped = {id(t) for g in acceleration.dit_layer_groups(dit) for m in g for t in m.parameters()}
    per_layer = {id(p) for name, p in dit.named_parameters()
                 if re.search(r"(^transformer\.layers|_list|adaLN_modulations)\.\d+\.", name)}
    assert grouped == per_layer


def test_streamed_layers_compute_the_same_function(dit):
    x, t, ctx, flow = tiny_inputs()
    with torch.no_grad():
        expected = dit(x, t, ctx, video_flow=flow)
        streamer = acceleration.LayerStreamer(acceleration.dit_layer_groups(dit), torch.device("cpu"))
        dit.mixins.adaln_layer.layer_hooks.append(streamer)
        try:
            got = dit(x, t, ctx, video_flow=flow)
        finally:
            dit.mixins.adaln_layer.layer_hooks.remove(streamer)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _stack_of_blocks():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    model.head = torch.nn.Linear(4, 4)
    model.forward = lambda x: model.head(model.blocks[2](model.blocks[1](model.blocks[0](x))))
    return model


def test_streamed_blocks_compute_the_same_function():
    model, x = _stack_of_blocks(), torch.randn(2, 4)
    expected = model(x)
    with acceleration.StreamedBlocks(model, model.blocks, torch.device("cpu")).on_device() as module:
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="placement across devices needs a GPU")
def test_streamed_blocks_keep_block_weights_on_the_host_except_while_running():
    model, x = _stack_of_blocks(), torch.randn(2, 4)
    expected = model(x)
    placed = acceleration.StreamedBlocks(model, model.blocks, torch.device("cuda"))
    assert {p.device.type for p in model.blocks.parameters()} == {"cpu"}
    assert {p.device.type for p in model.head.parameters()} == {"cuda"}
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, _a: seen.append(m.weight.device.type))
    with placed.on_device() as module:
        torch.testing.assert_close(module(x.cuda()).cpu(), expected)
    assert seen == ["cuda"]  # on the device while it runs, back on the host afterwards
    assert model.blocks[1].weight.device.type == "cpu"


def test_fp8_linear_is_close_and_replaces_every_layer_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(3, 10, 64)
    fp8 = acceleration.Fp8Linear(linear)
    rel = (fp8(x) - linear(x)).norm() / linear(x).norm()
    assert 1e-4 < rel < 0.06  # quantised (not exact), but close
    model = DiffusionTransformer(network_params_from(TINY)).eval()
    x, t, ctx, flow = tiny_inputs()
    with torch.no_grad():
        exact = model(x, t, ctx, video_flow=flow)
        assert acceleration.use_fp8_matmuls(model) == 4 * TINY["num_layers"]
        approx = model(x, t, ctx, video_flow=flow)
    assert psnr(approx, exact) > 25


def test_first_block_cache_skips_only_similar_steps(dit):
    x, t, ctx, flow = tiny_inputs()
    motion = dit.prepare_motion(flow, "modulation")
    with torch.no_grad():
        exact = dit(x, t, ctx, motion=motion)
        never = acceleration.FirstBlockCache(TINY["num_layers"], threshold=0.0, warmup_calls=0)
        for _ in range(3):
            out = dit(x, t, ctx, motion=motion, step_cache=never)
        assert never.skipped_calls == 0
        torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6)
        always = acceleration.FirstBlockCache(TINY["num_layers"], threshold=1e9, warmup_calls=1,
                                              max_consecutive_skips=10)
        first = dit(x, t, ctx, motion=motion, step_cache=always)
        reused = dit(x * 1.01, t, ctx, motion=motion, step_cache=always)  # a "next step"
    assert always.skipped_calls == 1
    torch.testing.assert_close(first, exact, rtol=1e-6, atol=1e-6)
    assert psnr(reused, exact) > 20 and not torch.equal(reused, exact)


def test_regional_compile_matches_eager(dit):
    x, t, ctx, flow = tiny_inputs()
    with torch.no_grad():
        eager = dit(x, t, ctx, video_flow=flow)
        use_compiled_kernels(True)
        try:
            torch._dynamo.reset()
            compiled = dit(x, t, ctx, video_flow=flow)
            compiled_again = dit(x, t, ctx, video_flow=flow)
        finally:
            use_compiled_kernels(False)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_again, compiled, rtol=0, atol=0)


def test_sdpa_backend_choice(dit):
    x, t, ctx, flow = tiny_inputs()
    with torch.no_grad(), acceleration.sdpa_backend("math"):
        math = dit(x, t, ctx, video_flow=flow)
    torch.testing.assert_close(math, dit(x, t, ctx, video_flow=flow), rtol=1e-4, atol=1e-4)


def test_vae_encode_falls_back_to_chunks_when_out_of_memory(caplog):
    from types import SimpleNamespace

    from tora.config import load_config
    from tora.engine import ToraEngine

    class FakeVAE:
        params = SimpleNamespace(encode_chunk_frames=0)
        calls = []

        def encode(self, video, chunk_frames=None):
            self.calls.append(chunk_frames)
            if chunk_frames is None:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return "posterior"

    engine = ToraEngine.__new__(ToraEngine)
    engine.cfg = load_config()
    vae = FakeVAE()
    assert engine._encode_within_memory(vae, torch.zeros(1, 3, 49, 8, 8)) == "posterior"
    assert vae.calls == [None, 8] and "8-frame chunks" in caplog.text
    engine.cfg.model.first_stage_config.params.encode_fallback_chunk_frames = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine._encode_within_memory(FakeVAE(), torch.zeros(1, 3, 49, 8, 8))
