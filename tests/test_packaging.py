"""What `pip install diptych` ships: one import root, every module and C source, no name another
distribution provides, and an installed package of a folder's name is never shadowed from the checkout."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("engine", "kernels", "prefill", "decode", "router", "cluster")  # each is diptych.<folder>


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Built from a fresh copy of the sources: setuptools reuses a checkout's build/ folder, whose stale
    files would hide a module the configuration leaves out."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for folder in SHIPPED:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, cwd=out)
    (wheel,) = out.glob("diptych-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_has_one_import_root(wheel_files: set[str]) -> None:
    roots = {name.split("/")[0] for name in wheel_files if ".dist-info/" not in name}
    assert roots == {"diptych"}


def test_the_wheel_ships_every_module_and_c_source(wheel_files: set[str]) -> None:
    for folder in SHIPPED:
        sources = [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".c")]
        assert sources, folder
        for path in sources:
            if "__pycache__" not in path.parts:
                assert f"diptych/{path.relative_to(ROOT).as_posix()}" in wheel_files, path


def test_no_other_distribution_provides_our_import_names(wheel_files: set[str]) -> None:
    providers = importlib.metadata.packages_distributions()
    for root in {name.split("/")[0] for name in wheel_files if ".dist-info/" not in name}:
        assert set(providers.get(root, ["diptych"])) == {"diptych"}, (root, providers[root])


def test_the_top_folders_never_shadow_an_installed_package_of_their_name() -> None:
    for folder in SHIPPED:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ would shadow PyPI's {folder}"
    installed = [name for name in SHIPPED if name in importlib.metadata.packages_distributions()]
    for name in installed:  # Hugging Face's `kernels`, which transformers 5.25 requires, for one
        found = subprocess.run(
            [sys.executable, "-c", f"import {name}; print({name}.__file__)"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert not found.startswith(str(ROOT / name)), found
