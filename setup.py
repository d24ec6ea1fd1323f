"""Build script for the optional compiled extension ``simcse_fast._C`` (CUDA pooling kernels).
The package metadata lives in pyproject.toml.

The extension is compiled and linked by nvcc alone (CUDA runtime linked statically, nothing of
PyTorch), so it builds on machines without a GPU and does not depend on torch's CUDA version.

Environment:
    SIMCSE_FAST_BUILD_CUDA   auto (default): build when nvcc is found, else install pure Python;
                             1: always build, fail loudly without nvcc; 0: never build.
    SIMCSE_FAST_CUDA_ARCHS   semicolon-separated compute capabilities (default "80;90").
    CUDA_HOME / CUDA_PATH    where to look for bin/nvcc before PATH.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SOURCES = ["csrc/pooling.cu", "csrc/bindings.cpp"]
BUILD_MODES = ("auto", "0", "1")


def find_nvcc():
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build_mode():
    mode = os.environ.get("SIMCSE_FAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in BUILD_MODES:
        sys.exit(f"SIMCSE_FAST_BUILD_CUDA must be one of {', '.join(BUILD_MODES)}; got {mode!r}")
    return mode


def gencode_flags():
    archs = [
        arch.strip().replace(".", "") for arch in os.environ.get("SIMCSE_FAST_CUDA_ARCHS", "80;90").split(";")
    ]
    if not all(arch.isdigit() for arch in archs if arch):
        sys.exit(
            f"SIMCSE_FAST_CUDA_ARCHS must look like '80;90'; got {os.environ['SIMCSE_FAST_CUDA_ARCHS']!r}"
        )
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs if arch]


class NvccBuildExt(build_ext):
    """Compiles and links the CUDA extension with one nvcc command."""

    def build_extension(self, ext):
        import pybind11

        nvcc = find_nvcc()
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        command = [
            nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            "--expt-relaxed-constexpr", *gencode_flags(),
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            *[str(ROOT / source) for source in ext.sources], "-o", str(target),
        ]  # fmt: skip
        print("building simcse_fast._C:", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def extensions():
    mode = build_mode()
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            sys.exit("SIMCSE_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        print("nvcc not found: installing simcse_fast without the compiled 'cuda' backend", flush=True)
        return []
    return [Extension("simcse_fast._C", sources=SOURCES)]


ext_modules = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt} if ext_modules else {})
