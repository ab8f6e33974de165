"""The batched sampler against independent references: a pure-Python splitmix64, float64 masks built by
hand, and chi-square tests of many seeded draws (deterministic: the seeds are fixed)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch

from diptych.engine.messages import SamplingParams
from diptych.engine.sampler import (
    SamplingBatch,
    chunked_argmax,
    greedy_argmax,
    hash_uniforms,
    mix64,
    sample,
    unit_interval,
    warm_up,
)

CPU = torch.device("cpu")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MASK64 = 2**64 - 1


# ---------------------------------------------------------------- factories and references


def make_batch(
    params: Sequence[SamplingParams],
    seeds: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    device: torch.device = CPU,
) -> SamplingBatch:
    seeds = list(range(len(params))) if seeds is None else seeds
    steps = [0] * len(params) if steps is None else steps
    return SamplingBatch.build(params, seeds, steps, device)


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int, vary: str = "seed") -> torch.Tensor:
    """n draws for one row of logits: n different seeds at step 0, or seed 7 at n different steps."""
    seeds = list(range(n)) if vary == "seed" else [7] * n
    steps = [0] * n if vary == "seed" else list(range(n))
    batch = make_batch([params] * n, seeds, steps)
    return sample(logits_row.expand(n, -1), batch).token_ids


def py_mix64(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def py_uniform(seed: int, step: int, index: int) -> float:
    golden = 0x9E3779B97F4A7C15
    stream = py_mix64((py_mix64(seed) + step * golden) & MASK64)
    bits = py_mix64(stream + (index + 1) * golden)
    return ((bits >> 12) + 0.5) / 2**52


def reference_probs(logits_row: torch.Tensor, p: SamplingParams) -> list[float]:
    """float64 target distribution: temperature, then top-k, top-p, min-p; ties at a cut are kept."""
    z = [float(x) / p.temperature for x in logits_row.double()]
    keep = set(range(len(z)))
    if p.top_k:
        kth = sorted(z, reverse=True)[min(p.top_k, len(z)) - 1]
        keep = {i for i in keep if z[i] >= kth}
    probs = _softmax(z, keep)
    if p.top_p < 1.0:
        mass, last = 0.0, math.inf
        for i in sorted(keep, key=lambda i: -z[i]):
            mass, last = mass + probs[i], z[i]
            if mass >= p.top_p:
                break
        keep = {i for i in keep if z[i] >= last}
        probs = _softmax(z, keep)
    top = max(probs)
    keep = {i for i in keep if probs[i] >= p.min_p * top}
    return _softmax(z, keep)


def _softmax(z: list[float], keep: set[int]) -> list[float]:
    m = max(z[i] for i in keep)
    w = [math.exp(z[i] - m) if i in keep else 0.0 for i in range(len(z))]
    return [x / sum(w) for x in w]


def assert_matches(tokens: torch.Tensor, probs: list[float], min_p_value: float = 1e-3) -> None:
    """Never a token outside the support; counts pass a chi-square test at level min_p_value."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = torch.tensor(probs, dtype=torch.float64) * tokens.numel()
    outside = (expected == 0) & (counts > 0)
    assert not outside.any(), f"sampled outside the support: {outside.nonzero().flatten().tolist()}"
    support = expected > 0
    chi2 = ((counts - expected)[support] ** 2 / expected[support]).sum()
    df = int(support.sum()) - 1
    if df == 0:
        return
    p_value = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2).item()
    assert p_value > min_p_value, f"chi2={chi2.item():.1f} df={df} p={p_value:.2g}"


def logits_of(probs: Sequence[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ---------------------------------------------------------------- the hash


def test_mix64_matches_python_splitmix64() -> None:
    rng = random.Random(0)
    values = [0, 1, -1, 2**63 - 1, -(2**63)] + [rng.randrange(-(2**63), 2**63) for _ in range(200)]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & MASK64 for g in got] == [py_mix64(v) for v in values]
    # Published splitmix64 stream for seed 0: mix64(state + golden), mix64(state + 2 * golden).
    stream = torch.tensor([0x9E3779B97F4A7C15, 2 * 0x9E3779B97F4A7C15 & MASK64], dtype=torch.uint64)
    assert [x & MASK64 for x in mix64(stream.view(torch.int64)).tolist()] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
    ]


def test_hash_uniforms_match_python_reference() -> None:
    seeds = [0, 1, -3, 2**62 + 12345, -(2**63)]
    steps = [0, 5, 1, 1000, 2**40]
    u = hash_uniforms(torch.tensor(seeds), torch.tensor(steps), 37)
    for b, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        assert u[b].tolist() == [py_uniform(seed, step, v) for v in range(37)]


def test_uniforms_exclude_both_ends_and_noise_is_finite() -> None:
    extremes = torch.tensor([0, -1, 2**63 - 1, -(2**63), 4095, 4096], dtype=torch.int64)
    u = unit_interval(extremes)
    assert ((u > 0) & (u < 1)).all()
    assert u.min().item() == 2.0**-53 and u.max().item() == 1 - 2.0**-53
    # The race subtracts log q = log(-log u) from the logits: finite at both ends.
    assert torch.isfinite(torch.log(-torch.log(u)).float()).all()
    q = -torch.log(hash_uniforms(torch.arange(64), torch.arange(64) * 3, 4096))
    assert torch.isfinite(q).all() and (q > 0).all()
    # Exp(1) has mean 1 and variance 1; 262144 draws put the sample mean within 0.01 (5 sigma).
    assert abs(q.mean().item() - 1.0) < 0.01 and abs(q.var().item() - 1.0) < 0.03


# ---------------------------------------------------------------- determinism


def _mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.1, top_k=20, top_p=0.9, min_p=0.02),
    ]


def test_same_seed_and_step_give_same_token_across_calls_orders_and_batches() -> None:
    torch.manual_seed(0)
    vocab = 500
    params = _mixed_params() * 4
    logits = torch.randn(len(params), vocab) * 2
    seeds = [random.Random(i).randrange(2**63) for i in range(len(params))]
    steps = list(range(len(params)))
    base = sample(logits, make_batch(params, seeds, steps)).token_ids
    assert torch.equal(base, sample(logits, make_batch(params, seeds, steps)).token_ids)

    perm = torch.randperm(len(params)).tolist()
    shuffled = sample(
        logits[perm],
        make_batch([params[i] for i in perm], [seeds[i] for i in perm], [steps[i] for i in perm]),
    ).token_ids
    assert torch.equal(shuffled, base[perm])

    # Each row alone (no sort or min-p pass for the plain rows), and next to unrelated rows.
    for i in range(len(params)):
        alone = sample(logits[i : i + 1], make_batch([params[i]], [seeds[i]], [steps[i]])).token_ids
        assert alone.item() == base[i].item()
    others = torch.randn(3, vocab)
    crowd = [SamplingParams(top_k=2), SamplingParams(top_p=0.3), SamplingParams(min_p=0.5)]
    mixed = sample(
        torch.cat([others, logits]), make_batch(crowd + params, [11, 12, 13, *seeds], [0, 0, 0, *steps])
    ).token_ids
    assert torch.equal(mixed[3:], base)


def test_different_seeds_and_steps_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any fixed token would be a failure of the noise
    by_seed = draw(logits, SamplingParams(), 200, vary="seed")
    by_step = draw(logits, SamplingParams(), 200, vary="step")
    # 200 uniform draws over 1000 tokens: about 182 distinct are expected; far fewer means correlated noise.
    assert by_seed.unique().numel() > 150 and by_step.unique().numel() > 150
    assert not torch.equal(by_seed, by_step)


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize("vary", ["seed", "step"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_draws_follow_softmax_of_scaled_logits(vary: str, temperature: float) -> None:
    logits = torch.tensor([1.5, 0.2, -0.4, 0.9, -1.2, 0.0, 2.1, -2.0])
    params = SamplingParams(temperature=temperature)
    assert_matches(draw(logits[None], params, 20000, vary), reference_probs(logits, params))


def test_top_k_samples_only_the_k_largest_with_the_right_weights() -> None:
    torch.manual_seed(1)
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.5, top_k=5)
    tokens = draw(logits[None], params, 20000)
    assert set(tokens.tolist()) == set(logits.topk(5).indices.tolist())
    assert_matches(tokens, reference_probs(logits, params))


def test_top_k_keeps_every_token_tied_at_the_boundary() -> None:
    logits = torch.tensor([3.0, 1.0, 3.0, 3.0, 0.5, 1.0])
    tokens = draw(logits[None], SamplingParams(top_k=2), 3000)
    assert set(tokens.tolist()) == {0, 2, 3}


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.3, {0}), (0.5, {0, 1}), (0.7, {0, 1, 2}), (0.85, {0, 1, 2, 3}), (0.95, {0, 1, 2, 3, 4}), (1.0, None)],
)
def test_top_p_keeps_exactly_the_smallest_nucleus(top_p: float, nucleus: set[int] | None) -> None:
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]  # cumulative 0.4, 0.65, 0.8, 0.9, 0.96, 1.0
    params = SamplingParams(top_p=top_p)
    tokens = draw(logits_of(probs)[None], params, 20000)
    assert set(tokens.tolist()) == (nucleus if nucleus is not None else set(range(len(probs))))
    assert_matches(tokens, reference_probs(logits_of(probs), params))


def test_top_p_keeps_every_token_tied_with_the_last_of_the_nucleus() -> None:
    # The smallest nucleus for 0.5 is token 0 and one of the two 0.2s; the tie keeps both.
    probs = [0.4, 0.2, 0.2, 0.1, 0.1]
    params = SamplingParams(top_p=0.5)
    tokens = draw(logits_of(probs)[None], params, 20000)
    assert set(tokens.tolist()) == {0, 1, 2}
    assert_matches(tokens, reference_probs(logits_of(probs), params))


def test_min_p_never_samples_below_min_p_times_the_top_probability() -> None:
    probs = [0.5, 0.2, 0.16, 0.14, 0.1]  # min_p 0.3 cuts below 0.15
    params = SamplingParams(min_p=0.3)
    tokens = draw(logits_of(probs)[None], params, 20000)
    assert set(tokens.tolist()) == {0, 1, 2}
    assert_matches(tokens, reference_probs(logits_of(probs), params))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=10, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=1.7, top_k=12, top_p=0.9),
        SamplingParams(temperature=0.5, top_p=0.95, min_p=0.02),
        SamplingParams(temperature=1.2, top_k=6, min_p=0.2),
    ],
)
def test_combined_masks_match_the_reference(params: SamplingParams) -> None:
    torch.manual_seed(2)
    logits = torch.randn(24) * 1.5
    assert_matches(draw(logits[None], params, 20000), reference_probs(logits, params))


# ---------------------------------------------------------------- greedy, logprobs, numerics


def test_greedy_rows_take_argmax_of_raw_logits_next_to_random_rows() -> None:
    torch.manual_seed(3)
    greedy = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9),
        SamplingParams(temperature=1e-7),  # below GREEDY_TEMPERATURE
    ]
    params = [*greedy, SamplingParams(temperature=1.5), SamplingParams(top_k=50)] * 8
    logits = torch.randn(len(params), 300)
    tokens = sample(logits, make_batch(params)).token_ids
    is_greedy = torch.tensor([p.temperature < 1e-5 for p in params])
    assert torch.equal(tokens[is_greedy], logits.argmax(-1)[is_greedy])
    assert not torch.equal(tokens[~is_greedy], logits.argmax(-1)[~is_greedy])
    all_greedy = make_batch(greedy)
    assert all_greedy.all_greedy
    assert torch.equal(sample(logits[:3], all_greedy).token_ids, logits[:3].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_are_log_softmax_of_raw_logits_at_the_chosen_token(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    params = [
        SamplingParams(temperature=0.0, logprobs=True),
        SamplingParams(temperature=0.5, top_k=4, logprobs=True),
        SamplingParams(temperature=2.0, top_p=0.5),
        SamplingParams(min_p=0.3),
    ] * 4
    logits = (torch.randn(len(params), 1000) * 3).to(dtype)
    out = sample(logits, make_batch(params))
    reference = torch.log_softmax(logits.double(), dim=-1).gather(-1, out.token_ids[:, None]).squeeze(-1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), reference, atol=1e-5, rtol=1e-5)
    assert sample(logits, make_batch([SamplingParams()] * len(params))).logprobs is None


def test_extreme_inputs_never_produce_nan_or_an_out_of_range_token() -> None:
    vocab = 64
    logits = torch.randn(6, vocab) * 1e4
    logits[:, 40:] = -math.inf  # padded vocabulary
    logits[5] = -math.inf
    logits[5, 17] = 0.0  # a single finite token
    params = [
        SamplingParams(temperature=1e-5, top_k=1),
        SamplingParams(temperature=100.0, top_p=1e-6),
        SamplingParams(min_p=1.0, logprobs=True),
        SamplingParams(top_k=10_000, top_p=0.999999),
        SamplingParams(top_k=vocab, top_p=1.0, min_p=0.0),
        SamplingParams(top_k=3, top_p=0.5, min_p=0.5),
    ]
    out = sample(logits, make_batch(params))
    assert ((out.token_ids >= 0) & (out.token_ids < 40)).all()
    assert out.token_ids[5].item() == 17
    assert out.token_ids[2].item() == logits[2].argmax().item()  # min_p 1 leaves only the top token
    assert out.logprobs is not None and torch.isfinite(out.logprobs).all()


def test_build_reduces_seeds_modulo_2_64_and_sets_the_flags() -> None:
    logits = torch.randn(2, 100)
    plain = [SamplingParams(), SamplingParams()]
    a = sample(logits, make_batch(plain, [5, -1], [3, 3])).token_ids
    b = sample(logits, make_batch(plain, [5 + 2**64, 2**64 - 1], [3, 3])).token_ids
    assert torch.equal(a, b)
    batch = make_batch([SamplingParams(temperature=0.0, top_k=5, min_p=0.5), SamplingParams(logprobs=True)])
    assert (batch.want_logprobs, batch.all_greedy, batch.any_top_k_top_p, batch.any_min_p) == (
        True,
        False,
        False,
        False,
    )
    batch = make_batch([SamplingParams(top_p=0.9), SamplingParams(min_p=0.1)])
    assert batch.any_top_k_top_p and batch.any_min_p and not batch.want_logprobs
    assert batch.seeds.dtype == batch.top_k.dtype == batch.steps.dtype == torch.int64
    assert batch.temperature.dtype == batch.top_p.dtype == batch.min_p.dtype == torch.float32


def test_empty_batch() -> None:
    out = sample(torch.zeros(0, 10), make_batch([]))
    assert out.token_ids.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_the_same_tokens_as_cpu() -> None:
    torch.manual_seed(5)
    params = _mixed_params() * 40
    logits = torch.randn(len(params), 32000) * 3
    seeds = [random.Random(i).randrange(-(2**63), 2**63) for i in range(len(params))]
    steps = [random.Random(-i).randrange(4096) for i in range(len(params))]
    cuda = torch.device("cuda")
    noise = hash_uniforms(torch.tensor(seeds), torch.tensor(steps), 32000)
    noise_gpu = hash_uniforms(torch.tensor(seeds, device=cuda), torch.tensor(steps, device=cuda), 32000)
    assert torch.equal(noise, noise_gpu.cpu())
    on_cpu = sample(logits, make_batch(params, seeds, steps))
    on_gpu = sample(logits.to(cuda), make_batch(params, seeds, steps, cuda))
    assert torch.equal(on_cpu.token_ids, on_gpu.token_ids.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_after_warm_up_the_cuda_sampler_never_recompiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving samples any number of rows, in inference mode (the workers' steps) or not: after the engine's
    warm-up none of that may compile again (a compile mid-serving stalled a prefill worker for seconds)."""
    import torch._dynamo.config

    cuda = torch.device("cuda")
    warm_up(512, cuda)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    modes = (torch.inference_mode, torch.no_grad, torch.enable_grad)
    for rows in (1, 2, 3, 7, 64):
        params = [SamplingParams(temperature=1.0)] * rows
        for mode in modes:
            with mode():
                out = sample(
                    torch.randn(rows, 512, device=cuda), make_batch(params, [1] * rows, [0] * rows, cuda)
                )
            assert out.token_ids.shape == (rows,)


def test_chunked_argmax_takes_the_first_index_of_the_maximum() -> None:
    logits = torch.randn(5, 96)
    logits[0, 10] = logits[0, 70] = 9.0  # tied across chunks: the earlier chunk's
    logits[1, 33] = logits[1, 35] = 9.0  # tied inside one chunk: the earlier index
    logits[2, 95] = 9.0  # the last element
    logits[3, 50] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    logits[4] = 1.0  # all equal: index 0
    expected = torch.tensor([10, 33, 95, 50, 0])
    assert torch.equal(logits.argmax(dim=-1), expected)
    for chunks in (1, 2, 3, 8, 96):
        assert torch.equal(chunked_argmax(logits, chunks), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 128256), (3, 49152), (64, 128256), (2, 32003)])
def test_greedy_argmax_equals_torch_argmax(device: str, rows: int, vocab: int) -> None:
    logits = torch.randn(rows, vocab, device=device).mul_(4).round_()  # rounded: many ties
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
