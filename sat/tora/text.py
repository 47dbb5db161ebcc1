"""Text conditioning: the frozen T5 v1.1-XXL encoder and the conditioner around it
(OFFICIAL_QUIRKS.md#uncond-zeros).

    conditioner = build_conditioner(cfg.model.conditioner_config, device="cuda", dtype=torch.bfloat16)
    context = conditioner(["a red car on a mountain road"])    # [B, 226, 4096], T5 last hidden state
    uncond_context = conditioner.unconditional(context)        # zeros (official force_uc_zero_embeddings)
    train_context = conditioner.drop_text(context)             # training: each sample zeroed w.p. ucg_rate

The encoder is read from a local folder only (nothing can reach a model hub), in the layout of the
official download ``ckpts/t5-v1_1-xxl``:

    config.json, model.safetensors.index.json + model-0000k-of-0000n.safetensors (or model.safetensors),
    spiece.model and/or tokenizer.json, tokenizer_config.json, ...

Official behaviour kept: padding to ``max_length`` (226) with truncation (225 tokens + EOS) and **no
attention mask**, so the pad tokens are attended to and their hidden states reach the DiT.

:func:`write_tiny_t5` writes a tiny random encoder with a real sentencepiece tokenizer in that layout,
for tests and the CPU demo.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import sentencepiece
import torch
from torch import nn
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from .errors import ToraError
from tora.config import ConditionerParams, ConfigError, Targeted

WEIGHTS_HELP = ("See README section 'Weights': use the official Tora download 'ckpts/t5-v1_1-xxl', or the "
                "subfolders 'text_encoder' (model) and 'tokenizer' of huggingface 'THUDM/CogVideoX-5b'.")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # either one is a complete T5 vocabulary


class TextEncoderNotFoundError(ToraError, FileNotFoundError):
    """The T5 folder, or a file it must contain, is missing (the message names the path)."""


class TextEncoderError(ToraError, ValueError):
    """The T5 folder's files do not make a usable encoder (the message names the folder or file)."""


# ----------------------------------------------------------------------------------------------
# Frozen T5 encoder
# ----------------------------------------------------------------------------------------------

class FrozenT5Embedder(nn.Module):
    """Prompts -> T5 encoder last hidden state [B, max_length, d_model]; frozen, always in eval mode.

    Attribute names follow the official embedder (``tokenizer``, ``transformer``).
    """

    def __init__(self, tokenizer: T5Tokenizer, transformer: T5EncoderModel, max_length: int = 226):
        super().__init__()
        if len(tokenizer) > transformer.config.vocab_size:
            raise TextEncoderError(f"tokenizer has {len(tokenizer)} tokens but the T5 encoder only "
                                   f"{transformer.config.vocab_size} embeddings: tokenizer and model do not match")
        self.tokenizer = tokenizer
        self.transformer = transformer.eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def from_folder(cls, model_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                    max_length: int = 226, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "FrozenT5Embedder":
        """Load from local folders (``tokenizer_dir`` defaults to ``model_dir``, the official layout)."""
        model_dir = Path(model_dir)
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
        check_t5_folders(model_dir, tokenizer_dir)
        tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        transformer, loading_info = T5EncoderModel.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype, output_loading_info=True)
        # transformers would leave missing weights randomly initialised (wrong shapes it refuses).
        if loading_info["missing_keys"]:
            raise TextEncoderError(f"T5 weights in {model_dir} lack {sorted(loading_info['missing_keys'])}")
        return cls(tokenizer, transformer, max_length).to(device)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def train(self, mode: bool = True) -> "FrozenT5Embedder":
        # Frozen means dropout off too, whatever mode the engine around it switches to.
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, max_length]: truncated to max_length - 1 tokens + EOS, then padded."""
        batch_encoding = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
        return batch_encoding.input_ids

    @torch.no_grad()  # not inference_mode: the training loss back-propagates through the DiT using it
    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Last hidden state [B, max_length, d_model] in the encoder's dtype, on its device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("FrozenT5Embedder needs at least one prompt")
        input_ids = self.tokenize(prompts).to(self.device)
        # Official: no attention mask, autocast off (T5 runs in its own dtype).
        with torch.autocast(self.device.type, enabled=False):
            return self.transformer(input_ids=input_ids).last_hidden_state


def check_t5_folders(model_dir: Path, tokenizer_dir: Path) -> None:
    """Raise :class:`TextEncoderNotFoundError` naming the first missing folder or file."""
    for folder in dict.fromkeys((model_dir, tokenizer_dir)):
        if not folder.is_dir():
            raise TextEncoderNotFoundError(
                f"T5 text encoder folder not found: {folder.resolve()}. {WEIGHTS_HELP}")
    if not (model_dir / "config.json").is_file():
        raise TextEncoderNotFoundError(f"{model_dir / 'config.json'} is missing. {WEIGHTS_HELP}")
    for shard in _weight_files(model_dir):
        if not shard.is_file():
            raise TextEncoderNotFoundError(f"T5 weight file {shard} is missing. {WEIGHTS_HELP}")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise TextEncoderNotFoundError(
            f"no T5 tokenizer in {tokenizer_dir}: expected {' or '.join(TOKENIZER_FILES)} (with the "
            f"huggingface layout, point tokenizer_dir at the 'tokenizer' subfolder). {WEIGHTS_HELP}")


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files the folder needs: the shards named by the index, else model.safetensors."""
    index_file = model_dir / "model.safetensors.index.json"
    if not index_file.is_file():
        return [model_dir / "model.safetensors"]
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, KeyError) as err:
        raise TextEncoderError(f"cannot read the shard index {index_file}: {err!r}") from None
    return [model_dir / name for name in sorted(set(weight_map.values()))]


# ----------------------------------------------------------------------------------------------
# Conditioner
# ----------------------------------------------------------------------------------------------

class GeneralConditioner(nn.Module):
    """Prompts -> DiT cross-attention context, with the official unconditional and dropout rules."""

    def __init__(self, embedder: FrozenT5Embedder, ucg_rate: float = 0.1, input_key: str = "txt"):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ConfigError(f"ucg_rate must lie in [0, 1], got {ucg_rate} (conditioner emb_models[0].ucg_rate)")
        self.embedder = embedder
        self.ucg_rate = ucg_rate
        self.input_key = input_key  # the batch field holding the prompts

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Conditional context T5(prompts) [B, L, D] (no dropout)."""
        return self.embedder(prompts)

    @staticmethod
    def unconditional(context: torch.Tensor) -> torch.Tensor:
        """Official: zeros instead of T5(""), so negative prompts have no effect and cost no T5 pass."""
        return torch.zeros_like(context)

    def drop_text(self, context: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training-time text dropout: each sample of ``context`` [B, L, D] zeroed w.p. ``ucg_rate``.

        Draws B Bernoulli samples from ``generator`` (default: the global RNG of the context's device).
        """
        rng_device = generator.device if generator is not None else context.device
        keep_probability = torch.full((context.shape[0],), 1.0 - self.ucg_rate, device=rng_device)
        keep = torch.bernoulli(keep_probability, generator=generator).to(context.device, context.dtype)
        return context * keep[:, None, None]


def build_conditioner(conditioner_config: Targeted[ConditionerParams], *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> GeneralConditioner:
    """The conditioner of ``cfg.model.conditioner_config``: one frozen T5 embedder."""
    embedder_configs = conditioner_config.params.emb_models
    key = "model.conditioner_config.params.emb_models"
    if len(embedder_configs) != 1:
        raise ConfigError(f"'{key}' must hold exactly one (T5) embedder, got {len(embedder_configs)}")
    embedder_config = embedder_configs[0]
    if embedder_config.is_trainable:
        raise ConfigError(f"'{key}[0].is_trainable' must be false: the T5 encoder is frozen")
    params = embedder_config.params
    embedder = FrozenT5Embedder.from_folder(params.model_dir, tokenizer_dir=params.tokenizer_dir,
                                            max_length=params.max_length, device=device, dtype=dtype)
    return GeneralConditioner(embedder, ucg_rate=embedder_config.ucg_rate,
                              input_key=embedder_config.input_key)


# ----------------------------------------------------------------------------------------------
# A tiny T5 in the real folder format (tests, CPU demo)
# ----------------------------------------------------------------------------------------------

TINY_T5_SENTENCES = (
    "a red car drives along a winding mountain road at sunset",
    "a small dog runs across the green park chasing a yellow ball",
    "waves crash against the rocky shore under a cloudy grey sky",
    "a young woman walks through a busy city street at night",
    "the camera slowly pans over a wide field of flowers",
    "an old man plays the guitar in front of a wooden house",
    "a white bird flies high above the quiet blue lake",
    "two children ride their bicycles down a sunny country lane",
    "a golden fish swims in circles inside a glass bowl",
    "snow falls softly on the roofs of a sleeping village",
    "a hot air balloon rises into the clear morning sky",
    "a black cat jumps from the table onto the kitchen floor",
    "leaves drift down from the tall trees in the autumn forest",
    "a sailing boat moves slowly across the calm sea",
    "a train crosses a long bridge over the deep river valley",
    "fireworks explode in bright colours above the dark harbour",
)


def write_tiny_t5(folder: str | os.PathLike, *, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                  d_ff: int = 64, vocab_size: int = 128, seed: int = 0, sentences=None) -> Path:
    """Write a tiny random T5 v1.1-style encoder + sentencepiece tokenizer; deterministic in ``seed``.

    The tokenizer is trained on ``sentences`` (default: a few fixed English sentences), e.g. the
    captions of a training set, so that their words are whole pieces.

    Same layout as the official folder (config.json, sharded safetensors with an index, spiece.model,
    tokenizer.json, tokenizer_config.json), so :meth:`FrozenT5Embedder.from_folder` reads it unchanged.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spiece_model = io.BytesIO()
    # T5's sentencepiece conventions: pad 0, eos 1, unk 2, no bos.  One thread: deterministic.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences or TINY_T5_SENTENCES) * 20), model_writer=spiece_model,
        vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (folder / "spiece.model").write_bytes(spiece_model.getvalue())
    # transformers 5 ignores T5Tokenizer(vocab_file=...), so hand over the pieces (OFFICIAL_QUIRKS.md#t5-folders).
    # No <extra_id_*> sentinels: built this way transformers numbers them in the opposite order to
    # the spiece.model route (and to T5), and prompts never use them.
    processor = sentencepiece.SentencePieceProcessor(model_proto=spiece_model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        transformer = T5EncoderModel(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    transformer.save_pretrained(folder, max_shard_size=weight_bytes // 2)  # sharded like the real one
    return folder
