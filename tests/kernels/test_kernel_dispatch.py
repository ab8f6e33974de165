"""DIPTYCH_KERNELS picks the path: auto follows the tensor's device, the other modes force one."""

from __future__ import annotations

import importlib

import pytest
import torch

from diptych.kernels import ops
from diptych.kernels.dispatch import use_triton

# The package re-exports the function `rms_norm`, which shadows the submodule of the same name.
rms_norm_module = importlib.import_module("diptych.kernels.rms_norm")


@pytest.mark.parametrize(
    ("mode", "expected"), [(None, False), ("auto", False), ("reference", False), ("triton", True)]
)
def test_mode_on_cpu_tensor(monkeypatch: pytest.MonkeyPatch, mode: str | None, expected: bool) -> None:
    if mode is None:
        monkeypatch.delenv("DIPTYCH_KERNELS", raising=False)
    else:
        monkeypatch.setenv("DIPTYCH_KERNELS", mode)
    assert use_triton(torch.zeros(1)) is expected


def test_unknown_mode_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIPTYCH_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DIPTYCH_KERNELS"):
        use_triton(torch.zeros(1))


@pytest.mark.parametrize(
    ("mode", "path"), [("reference", "rms_norm_reference"), ("triton", "rms_norm_triton")]
)
def test_public_op_takes_the_chosen_path(monkeypatch: pytest.MonkeyPatch, mode: str, path: str) -> None:
    monkeypatch.setenv("DIPTYCH_KERNELS", mode)
    calls: list[str] = []
    monkeypatch.setattr(rms_norm_module, path, lambda *args: calls.append(path))
    ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-5)
    assert calls == [path]
