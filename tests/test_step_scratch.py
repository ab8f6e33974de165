"""Per-step derived state lives on the step's metadata: built once a step, never seen by another step."""

from __future__ import annotations

import dataclasses
import importlib
import threading
from collections.abc import Callable

import pytest
import torch

from diptych.engine.forward_context import forward_context
from diptych.engine.model import LayerRange
from diptych.kernels.step_scratch import StepScratch, derived
from tests.step_factories import Step, TinyModel, make_step, make_tiny_model, random_prompts

# The modules, not the functions `kernels.ops` re-exports under the same names.
decode_attention_module = importlib.import_module("diptych.kernels.decode_attention")
rope_module = importlib.import_module("diptych.kernels.rope")


@pytest.fixture(autouse=True)
def _references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch references throughout: they are the paths that derive per-step state."""
    monkeypatch.setenv("DIPTYCH_KERNELS", "reference")


def test_scratch_builds_once_and_none_builds_every_time() -> None:
    calls: list[int] = []

    def build() -> int:
        calls.append(1)
        return len(calls)

    scratch = StepScratch()
    assert [derived(scratch, "x", build) for _ in range(3)] == [1, 1, 1]
    assert [derived(None, "x", build) for _ in range(2)] == [2, 3]
    assert len(scratch) == 1


def test_every_metadata_starts_with_its_own_scratch() -> None:
    tiny = make_tiny_model()
    first, second = make_step(tiny, [([1, 2], 0)]).meta, make_step(tiny, [([1, 2], 0)]).meta
    assert first.scratch is not second.scratch
    assert dataclasses.replace(first, kv_lens=first.kv_lens + 1).scratch is not first.scratch
    assert first == dataclasses.replace(first)  # the scratch takes no part in equality


def prefilled(seed: int, num_layers: int, lengths: list[int]) -> tuple[TinyModel, Step]:
    """A tiny model whose cache holds prompts of these lengths, and the decode step after them."""
    tiny = make_tiny_model(num_layers, seed=seed)
    prompts = random_prompts(lengths, tiny.vocab_size, seed=seed)
    run(tiny, make_step(tiny, [(p, 0) for p in prompts]))
    return tiny, make_step(tiny, [([seed + 3], len(p)) for p in prompts])


def run(tiny: TinyModel, step: Step) -> torch.Tensor:
    with torch.inference_mode(), forward_context(step.meta):
        return tiny.model.compute_logits(tiny.model(step.input_ids, step.positions))


def test_derived_state_is_built_once_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"plan": 0, "rope": 0}

    def counting(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object) -> object:
            counts[name] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(
        decode_attention_module, "_gather_plan", counting("plan", decode_attention_module._gather_plan)
    )
    monkeypatch.setattr(rope_module, "_rotation_table", counting("rope", rope_module._rotation_table))
    tiny, decode = prefilled(0, 4, [5, 9])
    assert counts == {"plan": 0, "rope": 1}  # the prefill: one rotation table for its 4 layers
    run(tiny, decode)
    assert counts == {"plan": 1, "rope": 2}
    run(tiny, make_step(tiny, [([3], 6), ([4], 10)]))  # the next step derives its own
    assert counts == {"plan": 2, "rope": 3}


def test_interleaved_steps_of_two_models_match_running_alone() -> None:
    """Two models in one process, each with its own cache and step (other layer counts, lengths and
    positions): a step of one run between the stages of the other changes neither's logits."""
    alone = [run(*prefilled(0, 4, [5, 9])), run(*prefilled(1, 3, [17, 2, 30]))]
    (tiny_a, step_a), (tiny_b, step_b) = prefilled(0, 4, [5, 9]), prefilled(1, 3, [17, 2, 30])
    with torch.inference_mode(), forward_context(step_a.meta):
        first = tiny_a.model.forward_layers(step_a.positions, LayerRange(0, 2), input_ids=step_a.input_ids)
    logits_b = run(tiny_b, step_b)
    with torch.inference_mode(), forward_context(step_a.meta):
        last = tiny_a.model.forward_layers(
            step_a.positions, LayerRange(2, 4), hidden=first.hidden, residual=first.residual
        )
        logits_a = tiny_a.model.compute_logits(last.hidden)
    torch.testing.assert_close(logits_a, alone[0], atol=0, rtol=0)
    torch.testing.assert_close(logits_b, alone[1], atol=0, rtol=0)


def test_two_threads_get_their_own_results() -> None:
    """An engine thread each, stepping at once: every step gives what it gives alone."""
    setups = [prefilled(0, 4, [5, 9]), prefilled(1, 3, [17, 2, 30])]
    alone = [run(tiny, step) for tiny, step in setups]
    results: list[list[torch.Tensor]] = [[], []]

    def steps(i: int) -> None:
        tiny, step = setups[i]
        for _ in range(20):
            fresh = dataclasses.replace(step.meta)  # a new step's metadata, and so a new scratch
            results[i].append(run(tiny, Step(step.input_ids, step.positions, fresh)))

    threads = [threading.Thread(target=steps, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for expected, got in zip(alone, results, strict=True):
        assert len(got) == 20
        for logits in got:
            torch.testing.assert_close(logits, expected, atol=0, rtol=0)
