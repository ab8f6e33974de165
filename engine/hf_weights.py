"""HF model directories: config.json plus safetensors weights, in one file or sharded with an index.

Problems with the directory raise ValueError; `engine.loader` adds the path and makes them ModelLoadError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from diptych.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters: RoPE frequencies are recomputed from the config.
_NOT_PARAMETERS = ("rotary_emb.inv_freq",)


def load_config(path: Path) -> ModelConfig:
    raw = read_json(path / "config.json")
    # Checked first: an unsupported model's config lacks the keys from_hf would complain about instead.
    arch = (raw.get("architectures") or [""])[0]
    if arch and arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return ModelConfig.from_hf(raw)


def open_weights(path: Path, config: ModelConfig) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(tensor count, tensors); every file's header is read before any tensor, so bad files fail first."""
    names = {file: _tensor_names(file) for file in safetensors_files(path)}
    count = sum(len(keys) for keys in names.values())
    return count, _read(names)


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"no {file.name} (a HF model directory holds config.json and *.safetensors)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file.name} must hold a JSON object, not {type(data).__name__}")
    return data


def safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{INDEX_FILE} has no weight_map")
        files = sorted({path / str(shard) for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError("no *.safetensors files in the model directory")
    return files


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            names = f.keys()
        return [name for name in names if not name.endswith(_NOT_PARAMETERS)]
    except SafetensorError as e:
        raise ValueError(f"{file.name} is not a readable safetensors file ({e})") from None


def _read(names: dict[Path, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    for file, keys in names.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in keys:
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read {file.name} ({e})") from None
