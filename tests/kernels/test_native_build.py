"""Building the C kernels: once per host into the cache, and a clear error where the host cannot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from diptych.kernels import native


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load_library.cache_clear()
    yield tmp_path / "diptych" / "kernels"
    native.load_library.cache_clear()  # later tests load from the real cache again


def test_a_host_without_the_compiler_gets_a_clear_error(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(native.NativeBuildError, match="no C compiler 'no-such-cc'"):
        native.load_library("quantized_linear")


def test_a_compile_error_names_the_source(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    with pytest.raises(native.NativeBuildError, match=r"failed on broken\.c"):
        native.load_library("broken")
    assert not any(empty_cache.iterdir())  # no half-written library left behind


def test_built_once_into_the_cache(empty_cache: Path) -> None:
    if native.shutil.which("cc") is None:
        pytest.skip("no C compiler on this host")
    library = native.load_library("decode_attention")
    assert hasattr(library, "paged_decode_attention")
    built = list(empty_cache.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    native.load_library.cache_clear()
    native.load_library("decode_attention")  # as a new process would: it finds the library, builds nothing
    assert list(empty_cache.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
