"""Executors: what runs an engine core's step plans on devices.

The core (engine/core.py) decides what runs: which sequences, which tokens, which KV blocks. An executor
runs it: it owns the model (or the layers of it that live here), the paged KV cache, CUDA graphs and the
attention backend, over a layer range and a group of ranks. `LocalExecutor` is every layer on one device;
a pipeline stage or a context-parallel rank group is another implementation of the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq

import torch

from diptych.engine import sampler
from diptych.engine.config import RANDOM_PREFIX, ModelConfig, preset
from diptych.engine.engine_config import EngineConfig
from diptych.engine.forward_context import KVHook
from diptych.engine.kv_cache import PagedKVCache, kv_budget_bytes
from diptych.engine.linear import use_cpu_weight_layout
from diptych.engine.loader import (
    ModelSource,
    iter_quantized_weights,
    iter_weights,
    load_model_config,
    resolve_model,
)
from diptych.engine.model import LayerRange, LlamaForCausalLM, build_model, init_random_weights
from diptych.engine.model_runner import LaunchedStep, ModelRunner, SampledTokens
from diptych.engine.scheduler import SchedulerOutput
from diptych.kernels import native, ops


class Executor(ABC):
    """Runs step plans over a range of a model's layers, in paged KV blocks it owns.

    Thread rules: `launch` and `resolve` run on the engine thread only; `write_kv` may run on a KV
    receiver thread, for slots of blocks the core has reserved and not yet scheduled (disjoint from every
    slot a step reads or writes)."""

    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    block_size: int
    num_blocks: int  # KV blocks this executor's cache holds (the core's block manager hands them out)
    layers: LayerRange  # the model's layers this executor holds

    @abstractmethod
    def launch(
        self,
        plan: SchedulerOutput,
        tables: Seq[Seq[int]],
        kv_hook: KVHook | None = None,
        previous: LaunchedStep | None = None,
    ) -> LaunchedStep:
        """Queue the plan's forward and sampling (tables[i]: the i-th chunk's block table); no waiting."""

    @abstractmethod
    def resolve(self, step: LaunchedStep) -> SampledTokens:
        """The step's sampled tokens on the host (waits for the step)."""

    @abstractmethod
    def write_kv(self, layers: range, keys_values: torch.Tensor, slots: torch.Tensor) -> None:
        """Write KV that arrived from elsewhere: keys_values [len(layers), 2, T, kv_heads, head_dim] into
        `slots` [T] (int64, on this executor's device) of each layer's cache."""


def load_model(config: EngineConfig) -> tuple[LlamaForCausalLM, ModelSource | None]:
    """Build the model on its device with weights from the checkpoint, or random ones for a preset shape."""
    device, dtype = config.torch_device, config.torch_dtype
    if config.model and config.model.startswith(RANDOM_PREFIX):
        model_config = preset(config.model[len(RANDOM_PREFIX) :])
        source = None
    else:
        source = resolve_model(config.model)
        model_config = load_model_config(source)
    model = build_model(model_config, dtype, device)
    if source is None:
        init_random_weights(model, config.seed)
    else:
        model.load_weights(iter_weights(source, dtype, progress=config.load_progress))
    use_cpu_weight_layout(model)
    if source is not None and config.keeps_quantized_weights:
        model.attach_quantized_weights(iter_quantized_weights(source))
    return model.eval(), source


class LocalExecutor(Executor):
    """Every layer of the model on one device (CPU or one GPU), in one process."""

    def __init__(self, config: EngineConfig, model: LlamaForCausalLM | None = None) -> None:
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.model, self.source = (model, None) if model is not None else load_model(config)
        self.model_config = self.model.config
        self.layers = self.model.model.all_layers
        budget = kv_budget_bytes(self.device, config.kv_cache_gib, config.gpu_memory_fraction)
        self.kv_cache = PagedKVCache.from_budget(
            self.model_config, budget, config.block_size, self.dtype, self.device
        )
        self.block_size, self.num_blocks = config.block_size, self.kv_cache.num_blocks
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)

    def prepare(self, config: EngineConfig, max_model_len: int) -> None:
        """Capture CUDA graphs, build CPU kernels and warm the sampler before the first step."""
        if config.cuda_graphs and self.device.type == "cuda":
            self.runner.capture_decode_graphs(config.max_num_seqs, max_model_len)
        if self.device.type == "cpu":
            native.build_all()
        sampler.warm_up(self.model_config.vocab_size, self.device)

    def launch(
        self,
        plan: SchedulerOutput,
        tables: Seq[Seq[int]],
        kv_hook: KVHook | None = None,
        previous: LaunchedStep | None = None,
    ) -> LaunchedStep:
        return self.runner.launch(plan, tables, kv_hook, previous)

    def resolve(self, step: LaunchedStep) -> SampledTokens:
        return self.runner.resolve(step)

    def write_kv(self, layers: range, keys_values: torch.Tensor, slots: torch.Tensor) -> None:
        for i, layer in enumerate(layers):
            ops.store_kv_cache(
                keys_values[i, 0],
                keys_values[i, 1],
                self.kv_cache.key(layer),
                self.kv_cache.value(layer),
                slots,
            )
