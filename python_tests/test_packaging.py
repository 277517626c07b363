"""Packaging: pyproject.toml's metadata and build requirements, setup.py's torch check and the
sdist. The installs themselves take minutes each: `make check-install` (benchmarks/check_install.sh)."""

from __future__ import annotations

import email
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch

import vse_cuda

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH_SERIES = ".".join(torch.__version__.split("+")[0].split(".")[:2])


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("vse_cuda_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist setuptools' build backend makes of a copy of this tree without what the build and
    the venv leave in it, as in a fresh clone: (member names, PKG-INFO). In the tree itself an
    editable install's vse_cuda.egg-info/SOURCES.txt would add its files to the sdist."""
    tree, out = tmp_path_factory.mktemp("tree") / "vse_cuda", tmp_path_factory.mktemp("sdist")
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "*.so",
                                                              "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                   cwd=tree, check=True, capture_output=True)
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    return {name.removeprefix(f"{top}/") for name in names}, email.message_from_string(pkg_info)


def test_metadata():
    project = PYPROJECT["project"]
    assert project["name"] == "vse_cuda"
    assert project["requires-python"] == ">=3.10"
    assert (ROOT / project["readme"]).is_file()
    assert set(project["dynamic"]) == {"version", "dependencies"}
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["vse_cuda", "vse_cuda.*"]


def test_build_requirements_state_setup_pys_torch_range(setup_py):
    torch_requirements = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("torch")]
    assert torch_requirements == [f"torch{setup_py.TORCH_RANGE}"]
    assert setup_py.TORCH_RANGE == ">=2.11,<2.15"
    assert f"Supported PyTorch: **torch{setup_py.TORCH_RANGE}**" in (ROOT / "README.md").read_text()


def test_version_comes_from_the_package_only(sdist):
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vse_cuda.__version__"}
    _, pkg_info = sdist
    assert pkg_info["Version"] == vse_cuda.__version__


def test_sdist_holds_every_source_the_build_compiles(sdist):
    members, _ = sdist
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    assert any(name.endswith(".h") for name in sources) and any(name.endswith(".cuh") for name in sources)
    assert sources <= members
    assert {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "vse_cuda/__init__.py"} <= members
    assert not [name for name in members if name.endswith(".so")]


def test_built_package_requires_the_torch_series_it_was_built_against(sdist):
    _, pkg_info = sdist
    assert [r for r in pkg_info.get_all("Requires-Dist") if r.startswith("torch")] == [f"torch=={TORCH_SERIES}.*"]


@pytest.mark.parametrize("version, series", [("2.11.0", "2.11"), ("2.11.0a0+git5bc6f1e", "2.11"),
                                             ("2.13.0+cpu", "2.13"), ("2.14.1+cu130", "2.14")])
def test_torch_check_accepts_the_range(setup_py, version, series):
    assert setup_py.check_torch(version) == series
    assert setup_py.requirements(version)[0] == f"torch=={series}.*"


@pytest.mark.parametrize("version", ["2.10.2", "2.15.0", "2.110.0", "1.13.1+cu117", "3.0.0", "nightly"])
def test_torch_check_names_the_torch_and_the_range(setup_py, version):
    for check in (setup_py.check_torch, setup_py.requirements):
        with pytest.raises(SystemExit) as error:
            check(version)
        assert str(error.value) == (f"vse_cuda build: torch {version} is installed, but vse_cuda builds against "
                                    "torch>=2.11,<2.15; install one of those (pip install 'torch>=2.11,<2.15') "
                                    "or let `pip install .` build in isolation.")


def test_requirements_while_pip_installs_the_build_requirements(setup_py):
    assert setup_py.requirements(None) == ["numpy", "tqdm", "matplotlib"]
