"""Text conditioner: local T5 folder -> tokenizer + frozen encoder, zero unconditional, text dropout."""
import shutil
import socket

import pytest
import sentencepiece
import torch
from transformers import T5Config, T5EncoderModel

from tora.config import ConfigError, schema
from tora.text import (TINY_T5_SENTENCES, FrozenT5Embedder, GeneralConditioner, TextEncoderNotFoundError,
                       build_conditioner, write_tiny_t5)

EOS_ID, PAD_ID = 1, 0
LONG_PROMPT = " ".join(TINY_T5_SENTENCES * 3)  # far more than 226 tokens


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def embedder(t5_dir):
    return FrozenT5Embedder.from_folder(t5_dir)


@pytest.fixture
def t5_copy(t5_dir, tmp_path):
    return shutil.copytree(t5_dir, tmp_path / "t5")


def sentencepiece_ids(t5_dir, prompt):
    return sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model")).encode(prompt)


# ----------------------------------------------------------------------------------------------
# Folder format and loading
# ----------------------------------------------------------------------------------------------

def test_written_folder_has_the_official_layout(t5_dir):
    names = {path.name for path in t5_dir.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "spiece.model", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2  # sharded like the real one


def test_encode_shape_dtype_and_frozen(embedder):
    context = embedder(["a red car drives along a road", "a small dog runs"])
    assert context.shape == (2, 226, 32) and context.dtype == torch.float32
    assert torch.isfinite(context).all() and not context.requires_grad
    assert not any(p.requires_grad for p in embedder.parameters())
    GeneralConditioner(embedder).train()
    assert not embedder.transformer.training  # dropout stays off inside a training engine


def test_same_prompt_same_output_different_prompts_differ(embedder):
    pair = embedder(["a red car drives along a road", "a white bird flies above the lake"])
    alone = embedder("a red car drives along a road")
    torch.testing.assert_close(alone[0], pair[0])
    assert not torch.allclose(pair[0], pair[1], atol=1e-3)


def test_pad_tokens_are_attended_to(embedder):
    # No attention mask (official): the padded length changes the hidden states of the prompt tokens.
    embedder_16 = FrozenT5Embedder(embedder.tokenizer, embedder.transformer, max_length=16)
    short, full = embedder_16("a small dog runs"), embedder("a small dog runs")
    assert short.shape == (1, 16, 32)
    assert not torch.allclose(short[0, :3], full[0, :3], atol=1e-4)


def test_token_ids_are_sentencepiece_ids_plus_eos_then_padding(embedder, t5_dir):
    prompt = "a young woman walks through a busy city street"
    expected = sentencepiece_ids(t5_dir, prompt) + [EOS_ID]
    input_ids = embedder.tokenize([prompt])[0].tolist()
    assert input_ids == expected + [PAD_ID] * (226 - len(expected))


def test_long_prompt_is_truncated_to_max_length_with_eos(embedder, t5_dir):
    assert len(sentencepiece_ids(t5_dir, LONG_PROMPT)) > 226
    input_ids = embedder.tokenize([LONG_PROMPT])[0].tolist()
    assert input_ids == sentencepiece_ids(t5_dir, LONG_PROMPT)[:225] + [EOS_ID]
    assert embedder([LONG_PROMPT, "a cat"]).shape == (2, 226, 32)


def test_official_tokenizer_files_without_tokenizer_json(embedder, t5_copy):
    (t5_copy / "tokenizer.json").unlink()  # official download: spiece.model only
    reloaded = FrozenT5Embedder.from_folder(t5_copy)
    assert torch.equal(reloaded.tokenize([LONG_PROMPT, "a cat"]), embedder.tokenize([LONG_PROMPT, "a cat"]))


def test_huggingface_layout_with_separate_tokenizer_folder(embedder, t5_copy, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        (t5_copy / name).rename(tokenizer_dir / name)
    with pytest.raises(TextEncoderNotFoundError, match="no T5 tokenizer in .*tokenizer_dir"):
        FrozenT5Embedder.from_folder(t5_copy)
    reloaded = FrozenT5Embedder.from_folder(t5_copy, tokenizer_dir=tokenizer_dir)
    torch.testing.assert_close(reloaded("a small dog runs"), embedder("a small dog runs"))


def test_tokenizer_larger_than_the_embedding_table_is_refused(embedder):
    small_transformer = T5EncoderModel(T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                                num_heads=2, is_encoder_decoder=False))
    with pytest.raises(ValueError, match="tokenizer has 128 tokens but the T5 encoder only 16"):
        FrozenT5Embedder(embedder.tokenizer, small_transformer)


def test_requested_dtype_and_moving(t5_dir):
    embedder_bf16 = FrozenT5Embedder.from_folder(t5_dir, dtype=torch.bfloat16)
    assert embedder_bf16("a cat").dtype == torch.bfloat16
    assert embedder_bf16.to(torch.float32)("a cat").dtype == torch.float32


def test_write_tiny_t5_is_deterministic_in_seed(embedder, tmp_path):
    again = FrozenT5Embedder.from_folder(write_tiny_t5(tmp_path / "again", seed=0))
    other = FrozenT5Embedder.from_folder(write_tiny_t5(tmp_path / "other", seed=1))
    assert torch.equal(again.tokenize([LONG_PROMPT]), embedder.tokenize([LONG_PROMPT]))
    assert torch.equal(again("a red car"), embedder("a red car"))
    assert not torch.allclose(other("a red car"), embedder("a red car"))


def test_no_network_access(t5_dir, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during T5 loading")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert FrozenT5Embedder.from_folder(t5_dir)("a cat").shape == (1, 226, 32)
    assert attempts == []


# ----------------------------------------------------------------------------------------------
# Missing files
# ----------------------------------------------------------------------------------------------

def test_missing_folder_names_path_and_weights_section(tmp_path):
    missing = tmp_path / "ckpts" / "t5-v1_1-xxl"
    expected = rf"{missing}.*README section 'Weights'.*THUDM/CogVideoX-5b"
    with pytest.raises(TextEncoderNotFoundError, match=expected):
        FrozenT5Embedder.from_folder(missing)


@pytest.mark.parametrize("victims, message", [
    (["config.json"], "config.json is missing"),
    (["model-00002-of-00003.safetensors"], "weight file .*model-00002-of-00003.safetensors is missing"),
    (["spiece.model", "tokenizer.json"], "no T5 tokenizer in"),
])
def test_missing_files_are_named(t5_copy, victims, message):
    for name in victims:
        (t5_copy / name).unlink()
    with pytest.raises(TextEncoderNotFoundError, match=rf"{message}.*'Weights'"):
        FrozenT5Embedder.from_folder(t5_copy)


def test_missing_tensor_is_an_error(t5_copy):
    from safetensors.torch import load_file, save_file
    shard = t5_copy / "model-00003-of-00003.safetensors"
    tensors = load_file(shard)
    del tensors["encoder.final_layer_norm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack \['encoder.final_layer_norm.weight'\]"):
        FrozenT5Embedder.from_folder(t5_copy)


# ----------------------------------------------------------------------------------------------
# Conditioner: unconditional, dropout, config
# ----------------------------------------------------------------------------------------------

def test_unconditional_is_zeros(embedder):
    conditioner = GeneralConditioner(embedder)
    context = conditioner(["a red car", "a cat"])
    uncond_context = conditioner.unconditional(context)
    assert uncond_context.shape == context.shape and uncond_context.dtype == context.dtype
    assert not uncond_context.any() and context.abs().sum() > 0


def dropped_samples(embedder, ucg_rate, batch_size=2000, seed=0):
    context = torch.ones(batch_size, 3, 2)
    dropped = GeneralConditioner(embedder, ucg_rate).drop_text(context, torch.Generator().manual_seed(seed))
    per_sample = dropped.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1).all(1)).all()  # whole samples, nothing else
    return (per_sample == 0).all(1)


def test_text_dropout_statistics(embedder):
    assert dropped_samples(embedder, 1.0).all()
    assert not dropped_samples(embedder, 0.0).any()
    assert 0.45 < dropped_samples(embedder, 0.5).float().mean() < 0.55
    assert 0.08 < dropped_samples(embedder, 0.1).float().mean() < 0.12  # the official rate
    assert torch.equal(dropped_samples(embedder, 0.5, seed=3), dropped_samples(embedder, 0.5, seed=3))
    assert not torch.equal(dropped_samples(embedder, 0.5, seed=3), dropped_samples(embedder, 0.5, seed=4))


def test_text_dropout_uses_the_global_rng_without_generator(embedder):
    conditioner = GeneralConditioner(embedder, ucg_rate=0.5)
    torch.manual_seed(7)
    first = conditioner.drop_text(torch.ones(64, 1, 1))
    torch.manual_seed(7)
    assert torch.equal(conditioner.drop_text(torch.ones(64, 1, 1)), first)


def test_ucg_rate_out_of_range(embedder):
    with pytest.raises(ValueError, match="ucg_rate must lie in"):
        GeneralConditioner(embedder, ucg_rate=1.5)


def test_build_conditioner_from_config(t5_dir):
    config = schema().model.conditioner_config
    embedder_config = config.params.emb_models[0]
    embedder_config.params.model_dir = str(t5_dir)
    embedder_config.params.max_length = 16
    embedder_config.ucg_rate = 0.25
    conditioner = build_conditioner(config)
    assert conditioner.ucg_rate == 0.25 and conditioner.input_key == "txt"
    assert conditioner("a cat").shape == (1, 16, 32)

    embedder_config.is_trainable = True
    with pytest.raises(ConfigError, match=r"emb_models\[0\].is_trainable' must be false"):
        build_conditioner(config)
    config.params.emb_models = []
    with pytest.raises(ConfigError, match="exactly one .* got 0"):
        build_conditioner(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_moving_between_cpu_and_gpu(embedder, t5_dir):
    moved = FrozenT5Embedder.from_folder(t5_dir, device="cuda")
    on_gpu = moved(["a red car", "a cat"])
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), embedder(["a red car", "a cat"]), atol=1e-4, rtol=1e-4)
    assert moved.to("cpu")("a cat").device.type == "cpu"
    dropped = GeneralConditioner(moved.to("cuda")).drop_text(on_gpu, torch.Generator().manual_seed(0))
    assert dropped.device.type == "cuda"
