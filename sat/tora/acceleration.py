"""Opt-in speed and memory modes for sampling (config section ``acceleration``, ``args.offload``).

Every mode leaves the model's weights and the default ("exact") path untouched; each one is switched
on separately and measured against exact by ``scripts/bench_sample.py``:

* ``LayerStreamer``      - sequential offload: transformer layer i's weights live in pinned host memory and
                           are copied onto the GPU just before layer i runs (layer i+1 is prefetched on a
                           side stream), so the DiT needs about one layer of weights on the GPU.
* ``StreamedBlocks``     - the same for a module that calls its blocks one by one (the T5 encoder).
* ``Fp8Linear``          - Hopper fp8 (e4m3) matmuls with per-row weight and per-token activation scales.
* ``FirstBlockCache``    - step caching: when the first layer's residual barely changed since the previous
                           step, reuse the previous step's residual of all other layers.
* ``cfg_parallel``       - the unconditional and conditional CFG halves on two GPUs (all-gather per step).
* ``sdpa_backend``       - pin the scaled-dot-product-attention kernel (cuDNN / flash / efficient / math).
Regional compilation lives next to the code it compiles (``tora.dit.use_compiled_kernels``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------
# Sequential offload
# ----------------------------------------------------------------------------------------------

class _HostCopy:
    """The tensors of some modules, kept in (pinned) host memory; attach device or host storage."""

    def __init__(self, modules: list[nn.Module], pin: bool):
        self.tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        self.host = [t.data.cpu().pin_memory() if pin else t.data.cpu() for t in self.tensors]
        self.attach(self.host)

    def attach(self, storage: list[torch.Tensor]) -> None:
        for tensor, data in zip(self.tensors, storage):
            tensor.data = data

    def to(self, device, non_blocking: bool = True) -> list[torch.Tensor]:
        return [h.to(device, non_blocking=non_blocking) for h in self.host]


class LayerStreamer:
    """DiT layer hook (``AdaLNMixin.layer_hooks``): layer i's weights on the device only while it runs.

    ``groups[i]`` = the modules holding layer i's weights.  With CUDA the copy of layer i+1 runs on a
    side stream while layer i computes.
    """

    def __init__(self, groups: list[list[nn.Module]], device: torch.device):
        self.device = device
        cuda = device.type == "cuda"
        self.copies = [_HostCopy(g, pin=cuda) for g in groups]
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pending: dict[int, tuple[list[torch.Tensor], Optional[torch.cuda.Event]]] = {}

    def _fetch(self, i: int) -> None:
        if i >= len(self.copies) or i in self.pending:
            return
        if self.stream is None:
            self.pending[i] = (self.copies[i].to(self.device, non_blocking=False), None)
            return
        with torch.cuda.stream(self.stream):
            data = self.copies[i].to(self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (data, event)

    def before_layer(self, i: int) -> None:
        self._fetch(i)
        data, event = self.pending.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in data:  # allocated on the side stream, used on this one
                t.record_stream(current)
        self.copies[i].attach(data)
        self._fetch(i + 1)  # overlaps with layer i

    def after_layer(self, i: int) -> None:
        self.copies[i].attach(self.copies[i].host)


def dit_layer_groups(dit) -> list[list[nn.Module]]:
    """The modules that hold transformer layer i's weights (SAT layer + its mixin entries)."""
    adaln = dit.mixins.adaln_layer
    groups = []
    for i, layer in enumerate(dit.transformer.layers):
        group = [layer, adaln.adaLN_modulations[i], adaln.fuser_list[i]]
        if adaln.qk_ln:
            group += [adaln.query_layernorm_list[i], adaln.key_layernorm_list[i]]
        groups.append(group)
    return groups


class StreamedDiT:
    """Placement for ``offload: sequential``: layer weights streamed, everything else resident."""

    def __init__(self, dit, device: torch.device):
        self.module = dit
        self.streamer = LayerStreamer(dit_layer_groups(dit), device)
        _place_unstreamed(dit, self.streamer.copies, device)

    @contextlib.contextmanager
    def on_device(self):
        hooks = self.module.mixins.adaln_layer.layer_hooks
        hooks.append(self.streamer)
        try:
            yield self.module
        finally:
            hooks.remove(self.streamer)


class StreamedBlocks:
    """Placement for ``offload: sequential`` of a module that calls its blocks one after the other
    (the T5 encoder): forward hooks put each block's weights on the device only while the block
    runs; the module's other tensors (embeddings, final norm) stay on the device."""

    def __init__(self, module: nn.Module, blocks: nn.ModuleList, device: torch.device):
        self.module = module
        copies = [_HostCopy([b], pin=device.type == "cuda") for b in blocks]
        for block, copy in zip(blocks, copies):
            block.register_forward_pre_hook(lambda _m, _a, c=copy: c.attach(c.to(device)))
            block.register_forward_hook(lambda _m, _a, _o, c=copy: c.attach(c.host))
        _place_unstreamed(module, copies, device)

    @contextlib.contextmanager
    def on_device(self):
        yield self.module


def _place_unstreamed(module: nn.Module, copies: list[_HostCopy], device: torch.device) -> None:
    """Move every tensor of ``module`` that none of the streamed ``copies`` holds onto ``device``."""
    streamed = {id(t) for c in copies for t in c.tensors}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in streamed:
            t.data = t.data.to(device)


# ----------------------------------------------------------------------------------------------
# fp8 matmuls
# ----------------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor):
    """[M, K] -> (fp8 [M, K], scale [M, 1] float32) with x ~= fp8 * scale, one scale per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with W and x in fp8 e4m3 (per-row weight scales, per-token activation scales)
    and bf16 output, via ``torch._scaled_mm`` on Hopper; elsewhere the same quantisation is
    emulated in float32 (for tests)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        weight = linear.weight.detach()
        self.out_features, self.in_features = weight.shape
        weight_fp8, weight_scale = quantize_rows(weight)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # [1, out]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scale = quantize_rows(rows)
        if x.is_cuda:
            y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:
            y = ((x_fp8.float() * x_scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def use_fp8_matmuls(dit) -> int:
    """Replace the four big linears of every transformer layer by :class:`Fp8Linear`; returns the count."""
    count = 0
    for layer in dit.transformer.layers:
        for parent, name in ((layer.attention, "query_key_value"), (layer.attention, "dense"),
                             (layer.mlp, "dense_h_to_4h"), (layer.mlp, "dense_4h_to_h")):
            setattr(parent, name, Fp8Linear(getattr(parent, name)))
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Step caching
# ----------------------------------------------------------------------------------------------

class FirstBlockCache:
    """First-block cache (as in ParaAttention's FBCache / TeaCache): per denoising call, run layer 0;
    if its residual differs from the previous call's by less than ``threshold`` (mean absolute
    difference relative to the previous residual's mean magnitude), skip layers 1..L-1 and add the
    residual those layers produced in the last fully computed call.  Pass it as ``step_cache=`` to
    every DiT call of one video; a new video needs a new cache.
    """

    def __init__(self, num_layers: int, threshold: float = 0.08, warmup_calls: int = 3,
                 max_consecutive_skips: int = 3):
        self.last = num_layers - 1
        self.threshold, self.warmup_calls, self.max_skips = threshold, warmup_calls, max_consecutive_skips
        self.calls = self.skipped_calls = self.consecutive = 0
        self.changes: list[float] = []  # the measured relative change of every compared call (diagnostics)
        self.skipping = False
        self.first_residual = self.first_output = self.rest_residual = None

    def skips_layer(self, i: int) -> bool:
        return self.skipping and i > 0

    def skip(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layers 1..L-1 pass the first layer's output through; the last adds the cached residual."""
        return hidden + self.rest_residual if i == self.last else hidden

    def after_layer(self, i: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if i == 0:
            residual = hidden_out - hidden_in
            self.skipping = self._similar(residual)
            self.first_residual, self.first_output = residual, hidden_out
            self.calls += 1
            self.skipped_calls += self.skipping
            self.consecutive = self.consecutive + 1 if self.skipping else 0
        if i == self.last:
            self.rest_residual = hidden_out - self.first_output

    def _similar(self, residual: torch.Tensor) -> bool:
        previous = self.first_residual
        if (previous is None or self.rest_residual is None or self.calls < self.warmup_calls
                or self.consecutive >= self.max_skips or previous.shape != residual.shape):
            return False
        change = float((residual - previous).abs().mean() / previous.abs().mean().clamp(min=1e-12))
        self.changes.append(change)  # one host sync per step
        return change < self.threshold


# ----------------------------------------------------------------------------------------------
# CFG parallel
# ----------------------------------------------------------------------------------------------

def cfg_parallel(network, group, rank_in_group: int):
    """Wrap a sampler network (x [2B], c_noise [2B], cond) so that each of the 2 ranks of ``group``
    computes its own CFG half ([uncond; cond] order: rank 0 -> uncond) and the halves are all-gathered.

    Extra keyword arguments (the motion conditioning) must already be this rank's half.
    """
    def call(x, c_noise, cond: dict, **model_kwargs):
        half = x.shape[0] // 2
        mine = slice(rank_in_group * half, (rank_in_group + 1) * half)
        local = network(x[mine], c_noise[mine], {k: v[mine] for k, v in cond.items()}, **model_kwargs)
        halves = [torch.empty_like(local) for _ in range(2)]
        torch.distributed.all_gather(halves, local.contiguous(), group=group)
        return torch.cat(halves)
    return call


# ----------------------------------------------------------------------------------------------
# Attention kernel choice
# ----------------------------------------------------------------------------------------------

SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def sdpa_backend(name: str):
    """Context pinning torch's SDPA kernel ("auto" lets torch choose)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])
