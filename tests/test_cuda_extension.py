"""The compiled extension simcse_fast._C: built by setup.py with nvcc (CI insists on it with
SIMCSE_FAST_BUILD_CUDA=1), importable without a GPU, with clear errors. Its numbers are checked
against the reference by the pooling tests wherever a GPU runs them (backend "cuda")."""

from __future__ import annotations

import os

import pytest
import torch

import simcse_fast as sf
from simcse_fast import _backends

FUNCTIONS = (
    "masked_mean_pool_forward",
    "masked_mean_pool_backward",
    "masked_max_pool_forward",
    "masked_max_pool_backward",
)


@pytest.fixture(scope="module")
def extension():
    if _backends.CUDA_EXTENSION is None:
        if os.environ.get("SIMCSE_FAST_BUILD_CUDA") == "1":
            pytest.fail(f"SIMCSE_FAST_BUILD_CUDA=1 but {_backends.CUDA_EXTENSION_ERROR}")
        pytest.skip(_backends.CUDA_EXTENSION_ERROR)
    return _backends.CUDA_EXTENSION


def test_extension_imports_and_exposes_its_functions(extension):
    for name in FUNCTIONS:
        assert callable(getattr(extension, name)), name
    assert extension.cuda_runtime_version >= 12000


def test_cuda_backend_is_listed_only_with_a_gpu(extension):
    assert ("cuda" in sf.available_backends()) == torch.cuda.is_available()


def test_bad_dtype_code_is_a_value_error(extension):
    with pytest.raises(ValueError, match="dtype must be"):
        extension.masked_mean_pool_forward(0, 0, 0, 2, 3, 32, 96, 32, 3, 1, 7, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="would launch on null pointers")
def test_launch_failure_names_the_kernel(extension):
    with pytest.raises(RuntimeError, match="masked_max_pool_forward_kernel"):
        extension.masked_max_pool_forward(0, 0, 0, 0, 2, 3, 32, 96, 32, 3, 1, 2, 0)


def test_explicit_cuda_backend_on_cpu_tensors_explains(extension):
    with pytest.raises(ValueError, match="need CUDA tensors"):
        sf.masked_mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3), backend="cuda")
