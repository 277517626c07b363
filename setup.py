"""Build driver for vse_cuda: runs CMakeLists.txt (the one source of truth for sources and flags).

Environment switches:
  VSE_CUDA=auto|0|1   compile the CUDA kernels with nvcc: auto (default) when a toolkit is found,
                      0 forces a CPU-only build (fast local loop), 1 requires CUDA (CI)
  VSE_SIMT=1|0        build the test-only SIMT library `_simt` (default 1)
  VSE_SANITIZE=...    sanitizers for `_C` and `_simt`, e.g. "address,undefined" or "thread"
  CUDA_HOME           toolkit root; default /usr/local/cuda, else found from the real nvcc
  TORCH_CUDA_ARCH_LIST  e.g. "8.0;9.0" (the default)
  MAX_JOBS            parallel compile jobs (default: number of cores)

Metadata is in pyproject.toml. This file adds the CMake build and the torch requirement: the
build accepts a torch in TORCH_RANGE and the package then requires the series it was built
against (torch==X.Y.*), since a C++ extension only loads into the torch whose headers it used.
`pip install .` builds in isolation against the newest torch of the range; `pip install
--no-build-isolation .` builds against the torch already installed (README "Installing").
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Torch series [oldest, beyond): the range of pyproject.toml's build requirements.
TORCH_OLDEST, TORCH_BEYOND = (2, 11), (2, 15)
TORCH_RANGE = f">={TORCH_OLDEST[0]}.{TORCH_OLDEST[1]},<{TORCH_BEYOND[0]}.{TORCH_BEYOND[1]}"


class BuildError(SystemExit):
    """A build problem explained in one sentence instead of a traceback."""

    def __init__(self, sentence: str):
        super().__init__(f"vse_cuda build: {sentence}")


def check_torch(version: str) -> str:
    """The series "X.Y" of torch `version` (e.g. "2.14.1+cu130", "2.11.0a0+git1234"), or a
    BuildError naming it and the supported range. Compared by series: a pre-release or local
    build of a supported series builds too."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not TORCH_OLDEST <= (int(match[1]), int(match[2])) < TORCH_BEYOND:
        raise BuildError(f"torch {version} is installed, but vse_cuda builds against torch{TORCH_RANGE}; "
                         f"install one of those (pip install 'torch{TORCH_RANGE}') or let `pip install .` "
                         "build in isolation.")
    return f"{match[1]}.{match[2]}"


def installed_torch() -> str | None:
    """The version of the torch this Python imports (the one CMake compiles against), or None
    while pip asks for the build requirements, before it has installed them."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements(torch_version: str | None) -> list[str]:
    """The package's dependencies, torch's being the series it is built against. None: pip is
    asking for the build requirements, before it has installed torch (that metadata is not kept)."""
    torch = [] if torch_version is None else [f"torch=={check_torch(torch_version)}.*"]
    return torch + ["numpy", "tqdm", "matplotlib"]


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root, or None. The nvcc on PATH may be a wrapper script, so the
    root is the folder whose bin/nvcc sits next to include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in filter(None, candidates):
        root = Path(candidate)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return root
    return None


def cuda_architectures() -> str:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = [a.strip().replace(".", "").replace("+PTX", "") for a in arch_list.replace(" ", ";").split(";")]
    return ";".join(a for a in archs if a)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake run builds every library into its build folder; each extension's file is then
    copied where setuptools wants it. CMake does not write there itself: an editable install's
    folder is a new temporary one on every install, which would relink every library each time."""

    def build_extension(self, ext: Extension) -> None:
        if not getattr(self, "_cmake_built", False):
            self._cmake_built = True
            self.run_cmake()
        target = Path(self.get_ext_fullpath(ext.name))
        self.mkpath(str(target.parent))
        self.copy_file(str(self.build_dir() / "vse_cuda" / target.name), str(target))

    def run_cmake(self) -> None:
        if TORCH_VERSION is None:
            raise BuildError(f"torch is not installed in {sys.executable}; install torch{TORCH_RANGE} first "
                             "or let `pip install .` build in isolation.")
        if shutil.which("cmake") is None:
            raise BuildError("cmake was not found on PATH; install it (pip install cmake or apt install cmake).")
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            raise BuildError("no C++ compiler found; install g++ (apt install g++) or set CXX.")
        build_dir = self.build_dir()
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DVSE_OUTPUT_DIR={build_dir / 'vse_cuda'}",
            f"-DVSE_WITH_SIMT={'OFF' if os.environ.get('VSE_SIMT', '1') == '0' else 'ON'}",
            f"-DVSE_SANITIZE={os.environ.get('VSE_SANITIZE', '')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        args += self.cuda_args()
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        log_path = build_dir / "build.log"
        with open(log_path, "w") as log:
            for command in (["cmake", "-S", str(ROOT), "-B", str(build_dir), *args],
                            ["cmake", "--build", str(build_dir), "--parallel", jobs]):
                log.write("$ " + " ".join(command) + "\n")
                log.flush()
                result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                log.write(result.stdout)
                if result.returncode != 0:
                    sys.stderr.write(result.stdout[-20000:])
                    raise BuildError(f"'{' '.join(command[:2])}' failed; the full log is {log_path}.")

    def build_dir(self) -> Path:
        return ROOT / "build" / self.build_variant()

    @staticmethod
    def build_variant() -> str:
        cuda = os.environ.get("VSE_CUDA", "auto")
        sanitize = os.environ.get("VSE_SANITIZE", "").replace(",", "-")
        return "-".join(filter(None, [f"cuda{cuda}", f"san-{sanitize}" if sanitize else ""]))

    @staticmethod
    def cuda_args() -> list[str]:
        mode = os.environ.get("VSE_CUDA", "auto")
        if mode not in ("auto", "0", "1"):
            raise BuildError(f"VSE_CUDA must be auto, 0 or 1, got {mode!r}.")
        if mode == "0":
            return ["-DVSE_WITH_CUDA=OFF"]
        cuda_home = find_cuda_home()
        if cuda_home is None:
            if mode == "1":
                raise BuildError("VSE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to the folder with bin/nvcc.")
            print("vse_cuda build: no CUDA toolkit found, building the CPU kernels only.", file=sys.stderr)
            return ["-DVSE_WITH_CUDA=OFF"]
        os.environ["CUDA_HOME"] = str(cuda_home)  # what torch and CMake's FindCUDAToolkit read
        return [
            "-DVSE_WITH_CUDA=ON",
            f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
            f"-DCUDAToolkit_ROOT={cuda_home}",
            f"-DVSE_CUDA_ARCHITECTURES={cuda_architectures()}",
        ]


TORCH_VERSION = installed_torch()

# setuptools' build backend runs this file as __main__; python_tests/test_packaging.py imports it.
if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("vse_cuda._C")]
        + ([] if os.environ.get("VSE_SIMT", "1") == "0" else [CMakeExtension("vse_cuda._simt")]),
        cmdclass={"build_ext": CMakeBuild},
        install_requires=requirements(TORCH_VERSION),
    )
