"""C kernels for the CPU, compiled on first use into a per-host cache and loaded with ctypes.

A source under kernels/csrc is built with the system C compiler (`CC`, default `cc`) for the host's own
instruction set (-march=native) and OpenMP. The cache key covers the source, the compiler, the flags and the
CPU's model and feature flags, so a home directory shared between different machines never loads a library
built for another CPU. A host without a working compiler falls back to the torch reference path, logging
the reason once; `DIPTYCH_NATIVE_KERNELS=0` turns the native kernels off (kernels.dispatch).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: F401  # loads torch's libgomp first, which the library then shares (same soname)

from diptych.kernels.dispatch import native_enabled

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
LIBS = ("-lm",)


class NativeBuildError(RuntimeError):
    """The C kernel could not be built or loaded on this host."""


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "diptych" / "kernels"


def build_all() -> None:
    """Build every kernel now (an engine on the CPU calls this at start-up), so a first request does not
    wait for the compiler; a host that cannot build them is told once, here."""
    if not native_enabled():
        return
    for source in sorted(SOURCE_DIR.glob("*.c")):
        try:
            load_library(source.stem)
        except NativeBuildError as e:
            logger.warning("CPU kernels run on the torch reference path (slower): %s", e)
            return


@functools.cache
def native_function(library: str, symbol: str, argtypes: tuple[type, ...]) -> Callable[..., None] | None:
    """`symbol` of kernels/csrc/<library>.c, or None (logged once) when the host cannot build it.
    Callers check `dispatch.use_native` first, on every call, so tests can switch the native path off."""
    try:
        fn = getattr(load_library(library), symbol)
    except NativeBuildError as e:
        logger.warning("%s runs on the torch reference path (slower): %s", symbol, e)
        return None
    fn.argtypes = list(argtypes)
    fn.restype = None
    return fn  # type: ignore[no-any-return]


@functools.cache
def load_library(name: str) -> ctypes.CDLL:
    """kernels/csrc/<name>.c built (once per host and source version) and loaded; NativeBuildError if not."""
    source = SOURCE_DIR / f"{name}.c"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C compiler {compiler!r} on PATH")
    key = hashlib.sha256()
    for part in (source.read_bytes(), _compiler_version(compiler), " ".join(FLAGS).encode(), _cpu_identity()):
        key.update(part)
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        _build(compiler, source, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise NativeBuildError(f"cannot load {target}: {e}") from None


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together (Ray workers) never load half a file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(source), "-o", partial, *LIBS], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise NativeBuildError(f"{compiler} failed on {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("built %s", target)


@functools.cache
def _compiler_version(compiler: str) -> bytes:
    result = subprocess.run([compiler, "--version"], capture_output=True, check=False)
    return result.stdout


@functools.cache
def _cpu_identity() -> bytes:
    """The CPU's model and feature flags (-march=native depends on both)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted)).encode()
