"""Build script for the optional compiled extension ``simcse_fast._C`` (CUDA pooling kernels).
The package metadata lives in pyproject.toml; MANIFEST.in puts csrc/ in the source distribution.

The extension is compiled and linked by nvcc alone (CUDA runtime linked statically, nothing of
PyTorch), so it builds on machines without a GPU and does not depend on torch's CUDA version.
Each architecture gets its machine code (SASS); the newest also gets PTX, which the driver
compiles at load time on GPUs newer than any listed.

Environment:
    SIMCSE_FAST_BUILD_CUDA   auto (default): build when nvcc is found; without nvcc, or when the
                             compile fails, warn and install pure Python (no "cuda" backend).
                             1: always build; fail the install without nvcc or on a compile error.
                             0: never build.
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
from setuptools.errors import CompileError

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
    text = os.environ.get("SIMCSE_FAST_CUDA_ARCHS", "80;90")
    archs = list(dict.fromkeys(arch.strip().replace(".", "") for arch in text.split(";") if arch.strip()))
    if not archs or not all(arch.isdigit() for arch in archs):
        sys.exit(f"SIMCSE_FAST_CUDA_ARCHS must look like '80;90'; got {text!r}")
    newest = max(archs, key=int)
    # Machine code for every architecture and PTX for the newest too: a GPU newer than all of
    # them compiles the PTX at load time instead of failing with "no kernel image is available".
    codes = {arch: f"[sm_{arch},compute_{arch}]" if arch == newest else f"sm_{arch}" for arch in archs}
    return [f"-gencode=arch=compute_{arch},code={code}" for arch, code in codes.items()]


def warn(message):
    """On stderr: pip shows a build's output only when it fails or with ``pip install -v``."""
    print(f"\nWARNING: {message}\n", file=sys.stderr, flush=True)


def nvcc_command(nvcc, target):
    """The one nvcc command that compiles and links the extension into ``target``."""
    import pybind11

    return [
        nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
        "--expt-relaxed-constexpr", *gencode_flags(),
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        *[str(ROOT / source) for source in SOURCES], "-o", str(target),
    ]  # fmt: skip


class NvccBuildExt(build_ext):
    """Compiles and links the CUDA extension with one nvcc command. Under ``auto`` the extension
    is ``optional``: a failed compile raises ``CompileError``, which setuptools turns into a
    skipped extension (and an install without it) instead of a failed install."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            command = nvcc_command(nvcc, target)
            print("building simcse_fast._C:", " ".join(command), flush=True)
            subprocess.run(command, check=True)
        except (ImportError, OSError, subprocess.CalledProcessError) as error:
            if isinstance(error, subprocess.CalledProcessError):
                reason = f"nvcc exited with status {error.returncode}"
            else:
                reason = str(error)
            if not ext.optional:
                raise CompileError(
                    f"building simcse_fast._C failed: {reason}; the output above says why"
                ) from error
            warn(
                f"building the CUDA extension simcse_fast._C failed: {reason} (the output above says why). "
                "Installing simcse_fast without it: everything works, but the 'cuda' backend is missing "
                "(Triton and PyTorch remain). Set SIMCSE_FAST_BUILD_CUDA=1 to make this failure fail "
                "the install, or SIMCSE_FAST_BUILD_CUDA=0 not to try."
            )
            raise CompileError(reason) from error


def extensions():
    mode = build_mode()
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            sys.exit("SIMCSE_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        warn("nvcc not found: installing simcse_fast without the compiled 'cuda' backend")
        return []
    return [Extension("simcse_fast._C", sources=SOURCES, optional=mode == "auto")]


# setuptools runs this file as __main__; imported (benchmarks/gpu_check.py), it only defines.
if __name__ == "__main__":
    ext_modules = extensions()
    setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt} if ext_modules else {})
