"""The model over a range of its layers: stages run back to back give the full forward's logits."""

from __future__ import annotations

import itertools

import pytest
import torch

from diptych.engine.forward_context import forward_context
from diptych.engine.model import LayerRange
from tests.step_factories import Step, TinyModel, make_step, make_tiny_model, random_prompts

NUM_LAYERS = 4
PROMPT_LENGTHS = [5, 11, 3]


def full_logits(tiny: TinyModel, step: Step) -> torch.Tensor:
    with torch.inference_mode(), forward_context(step.meta):
        return tiny.model.compute_logits(tiny.model(step.input_ids, step.positions))


def staged_logits(tiny: TinyModel, step: Step, cuts: list[int]) -> torch.Tensor:
    """The forward as stages [0, cuts[0]), [cuts[0], cuts[1]), ..., [cuts[-1], L), each handing the next
    its hidden and residual."""
    bounds = [0, *cuts, NUM_LAYERS]
    model = tiny.model
    with torch.inference_mode(), forward_context(step.meta):
        out = model.forward_layers(step.positions, LayerRange(0, bounds[1]), input_ids=step.input_ids)
        for start, end in itertools.pairwise(bounds[1:]):
            assert out.residual is not None
            out = model.forward_layers(
                step.positions, LayerRange(start, end), hidden=out.hidden, residual=out.residual
            )
        assert out.residual is None  # the last stage hands on the final-normed hidden states
        return model.compute_logits(out.hidden)


def prefill_and_decode(tiny: TinyModel) -> tuple[Step, Step]:
    """A prefill of three prompts, the second resuming after a cached prefix, and a decode step after it
    (the prefill's full forward fills the cache the decode step reads)."""
    prompts = random_prompts(PROMPT_LENGTHS, tiny.vocab_size)
    prefix = make_step(tiny, [(prompts[1][:4], 0)])
    full_logits(tiny, prefix)
    prefill = make_step(tiny, [(prompts[0], 0), (prompts[1][4:], 4), (prompts[2], 0)])
    decode = make_step(tiny, [([7], len(p)) for p in prompts])
    return prefill, decode


CUTS = [[1], [2], [NUM_LAYERS - 1], [1, 3], [1, 2, 3]]


@pytest.mark.parametrize("cuts", CUTS, ids=str)
def test_stages_give_the_full_forwards_logits(cuts: list[int]) -> None:
    tiny = make_tiny_model(NUM_LAYERS)
    prefill, decode = prefill_and_decode(tiny)
    for step in (prefill, decode):
        expected = full_logits(tiny, step)  # writes the step's KV, which the stages then write again
        torch.testing.assert_close(staged_logits(tiny, step, cuts), expected)
        assert expected.std() > 0.1  # logits that vary: the comparison means something


def test_full_range_is_the_forward() -> None:
    tiny = make_tiny_model(NUM_LAYERS)
    prefill, _ = prefill_and_decode(tiny)
    with torch.inference_mode(), forward_context(prefill.meta):
        whole = tiny.model(prefill.input_ids, prefill.positions)
        ranged = tiny.model.forward_layers(
            prefill.positions, LayerRange(0, NUM_LAYERS), input_ids=prefill.input_ids
        )
    assert ranged.residual is None
    torch.testing.assert_close(ranged.hidden, whole, atol=0, rtol=0)


def test_stages_keep_the_models_layer_index() -> None:
    """The KV hook names the layers a stage runs by their index in the whole model."""
    tiny = make_tiny_model(NUM_LAYERS)
    prompts = random_prompts([6], tiny.vocab_size)
    seen: list[int] = []
    step = make_step(tiny, [(prompts[0], 0)], kv_hook=lambda layer, k, v: seen.append(layer))
    with torch.inference_mode(), forward_context(step.meta):
        first = tiny.model.forward_layers(step.positions, LayerRange(0, 1), input_ids=step.input_ids)
        seen.append(-1)
        tiny.model.forward_layers(
            step.positions, LayerRange(1, 4), hidden=first.hidden, residual=first.residual
        )
    assert seen == [0, -1, 1, 2, 3]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [(2, 2, "must hold a layer"), (3, 1, "must hold a layer"), (-1, 2, "must hold a layer")],
)
def test_empty_or_negative_range_is_rejected(start: int, end: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerRange(start, end)


def test_range_past_the_model_is_rejected() -> None:
    tiny = make_tiny_model(NUM_LAYERS)
    step = make_step(tiny, [([3, 4], 0)])
    with (
        pytest.raises(ValueError, match=r"\[2, 5\) is past the model's 4 layers"),
        forward_context(step.meta),
    ):
        hidden = torch.zeros(2, 64)
        tiny.model.forward_layers(step.positions, LayerRange(2, 5), hidden=hidden, residual=hidden)


def test_stage_inputs_are_checked() -> None:
    tiny = make_tiny_model(NUM_LAYERS)
    step = make_step(tiny, [([3, 4], 0)])
    hidden = torch.zeros(2, 64)
    forward = tiny.model.forward_layers
    with forward_context(step.meta):
        with pytest.raises(ValueError, match=r"first stage \(layer 0\) takes input_ids"):
            forward(step.positions, LayerRange(0, 2))
        with pytest.raises(ValueError, match=r"first stage \(layer 0\) .* no hidden"):
            forward(step.positions, LayerRange(0, 2), input_ids=step.input_ids, hidden=hidden)
        with pytest.raises(ValueError, match="from layer 2 takes hidden and residual"):
            forward(step.positions, LayerRange(2, 4), input_ids=step.input_ids)
        with pytest.raises(ValueError, match="from layer 2 takes hidden and residual"):
            forward(step.positions, LayerRange(2, 4), hidden=hidden)
