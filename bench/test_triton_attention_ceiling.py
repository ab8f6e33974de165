"""bench/triton_attention_ceiling.py on CPU: every kernel variant through Triton's interpreter (fp32, tiny
shapes) against dense fp64 attention, the --smoke check's verdicts, and the report's ceiling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import triton_attention_ceiling as ceiling
from bench.triton_attention_ceiling import VARIANTS, LaunchShape, Row, Variant
from tests.kernels.helpers import INTERPRETED, naive_attention

interpreted = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
SIZE = (2, 64, 32)  # [H, L, D]: two query tiles of 32, so the unmasked loop runs for the second
# 32 x 16: two diagonal key tiles per query tile; 32 x 32: one, and block_m == block_n.
SHAPES = (LaunchShape(32, 16, 4, 1), LaunchShape(32, 32, 4, 1))
BY_NAME = {v.name: v for v in VARIANTS}


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[H, L, D] causal attention in fp64 through the kernel tests' naive reference ([L, H, D])."""
    length, head_dim = q.shape[1:]
    out, _ = naive_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), torch.arange(length), head_dim**-0.5
    )
    return out.transpose(0, 1)


@interpreted
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_kernel_matches_dense_attention(variant: Variant) -> None:
    ceiling.install_allocator("cpu")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*SIZE, generator=gen) for _ in range(3))
    for shape in SHAPES:
        out, _ = ceiling.causal_attention(q, k, v, variant, shape)
        torch.testing.assert_close(out.double(), dense_causal(q, k, v), atol=1e-5, rtol=1e-5)


@interpreted
def test_smoke_check_passes_every_variant() -> None:
    rows = list(ceiling.smoke_rows(VARIANTS, SHAPES, SIZE))
    assert [(r.variant, r.config) for r in rows] == [(v.name, str(s)) for v in VARIANTS for s in SHAPES]
    assert all(r.status == "ok" and r.max_diff is not None and r.max_diff <= ceiling.FP32_TOL for r in rows)


def test_smoke_check_flags_wrong_answers_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-causal answer is BAD, a NaN is BAD with no max_diff, a raise is ERROR unless the variant is
    known to fail (xfail)."""

    def not_causal(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant, shape: LaunchShape
    ) -> tuple[torch.Tensor, None]:
        if variant.name == "ptr":
            return F.scaled_dot_product_attention(q, k, v), None
        if variant.name == "tma_host":
            return torch.full_like(q, math.nan), None
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(ceiling, "causal_attention", not_causal)
    variants = [BY_NAME[name] for name in ("ptr", "tma_host", "tma_dev", "tma_dev_ws")]
    rows = {r.variant: r for r in ceiling.smoke_rows(variants, SHAPES[:1], SIZE)}
    assert rows["ptr"].status == "BAD" and rows["ptr"].max_diff is not None and rows["ptr"].max_diff > 0.1
    assert rows["tma_host"].status == "BAD" and rows["tma_host"].max_diff is None
    assert rows["tma_dev"].status == "ERROR" and "PassManager" in rows["tma_dev"].error
    assert rows["tma_dev_ws"].status == "xfail" and rows["tma_dev_ws"].expected_failure


def test_partial_tiles_are_rejected() -> None:
    t = torch.empty(1, 48, 16)
    with pytest.raises(AssertionError, match="partial tiles"):
        ceiling.kernel_args(t, t, t, t, BY_NAME["ptr"], LaunchShape(32, 16, 4, 1))


def test_report_names_the_fastest_correct_row_per_length(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    rows = [
        Row(name, "cfg", length, fraction=torch.rand(1, generator=gen).item(), ok=True)
        for length in (4096, 16384)
        for name in ("a", "b", "c")
    ]
    rows.append(Row("fast_but_wrong", "cfg", 4096, fraction=2.0, ok=False))
    rows.append(Row("nan", "cfg", 16384, max_diff=None, ok=False))  # a NaN answer: no figure, strict JSON
    path = tmp_path / "out" / "report.json"
    ceiling.write_report(path, {"gpu": "test"}, rows)
    doc = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    for length in (4096, 16384):
        best = max((r for r in rows if length == r.L and r.ok), key=lambda r: r.fraction or 0.0)
        assert doc["ceiling"][str(length)] == {
            "variant": best.variant,
            "config": "cfg",
            "fraction": best.fraction,
        }
    assert doc["gpu"] == "test" and len(doc["rows"]) == len(rows)
