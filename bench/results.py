"""One result format for every benchmark: a printed table and bench/results/<name>-<device>.json as
{"gpu", "torch", "triton", "date", "rows": [{"name", "value", "unit", "ceiling", "fraction", ...}], ...}."""

from __future__ import annotations

import datetime
import json
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

LOWER_IS_BETTER = ("ms", "s", "ratio")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    unit: str
    ceiling: float | None = None  # measured in the same run (copy bandwidth, matmul rate, a peer's figure)
    system: str | None = None  # which implementation, when a benchmark runs several side by side
    note: str = ""

    @property
    def fraction(self) -> float | None:
        """Of the ceiling reached: value / ceiling, or ceiling / value where lower is better (times)."""
        if not self.ceiling or not self.value:
            return None
        return self.ceiling / self.value if self.unit in LOWER_IS_BETTER else self.value / self.ceiling


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_path(name: str, device: str | None = None) -> Path:
    """bench/results/<name>-<device>.json, the device being this host's GPU (or CPU) unless given."""
    return RESULTS_DIR / f"{name}-{_slug(device or result_header()['device'])}.json"


def _versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def result_header() -> dict[str, Any]:
    """What every result document starts with: the device, the versions and the date."""
    return {
        "gpu": device_name() if torch.cuda.is_available() else None,
        "device": device_name() if torch.cuda.is_available() else "cpu",
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(
    name: str,
    rows: list[Row],
    extra: dict[str, Any] | None = None,
    compare: tuple[tuple[str, ...], str] | None = None,
) -> Path:
    """Print the table and write the JSON; with compare=((ours, ...), peer), each row of our systems gets
    the peer's figure of the same name as its ceiling."""
    if compare is not None:
        ours, peer = compare
        peer_value = {r.name: r.value for r in rows if r.system == peer}
        rows = [
            Row(r.name, r.value, r.unit, peer_value.get(r.name), r.system, f"vs {peer}")
            if r.system in ours
            else r
            for r in rows
        ]
    doc: dict[str, Any] = {
        **result_header(),
        "rows": [{**asdict(r), "fraction": r.fraction} for r in rows],
        **(extra or {}),
    }
    print(format_table(rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = result_path(name, doc["device"])
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def format_table(rows: list[Row]) -> str:
    lines = [f"{'name':<34} {'system':<9} {'value':>12} {'unit':<8} {'ceiling':>12} {'fraction':>8}"]
    for r in rows:
        ceiling = f"{r.ceiling:12.2f}" if r.ceiling else " " * 12
        fraction = f"{r.fraction:8.2f}" if r.fraction is not None else " " * 8
        lines.append(f"{r.name:<34} {r.system or '':<9} {r.value:12.2f} {r.unit:<8} {ceiling} {fraction}")
    return "\n".join(lines)
