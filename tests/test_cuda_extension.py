"""The compiled extension simcse_fast._C: built by setup.py with nvcc (CI insists on it with
SIMCSE_FAST_BUILD_CUDA=1), importable without a GPU, with clear errors. Its numbers are checked
against the reference by the pooling tests wherever a GPU runs them (backend "cuda")."""

from __future__ import annotations

import os

import pytest
import torch

import simcse_fast as sf
from simcse_fast import _backends


@pytest.fixture(scope="module")
def extension():
    if _backends.CUDA_EXTENSION is None:
        if os.environ.get("SIMCSE_FAST_BUILD_CUDA") == "1":
            pytest.fail(f"SIMCSE_FAST_BUILD_CUDA=1 but {_backends.CUDA_EXTENSION_ERROR}")
        pytest.skip(_backends.CUDA_EXTENSION_ERROR)
    return _backends.CUDA_EXTENSION


def test_extension_imports_and_exposes_its_entry_points(extension):
    assert callable(extension.launch) and callable(extension.kernels_available)
    args = extension.PoolingArgs()
    args.hidden, args.stride_x_seq, args.dtype = 768, 768, 2
    assert (args.hidden, args.stride_x_seq, args.dtype, args.x) == (768, 768, 2, 0)
    assert extension.cuda_runtime_version >= 12000


def test_cuda_backend_is_listed_only_with_a_gpu_it_has_kernels_for(extension):
    runs_here = torch.cuda.is_available() and extension.kernels_available(torch.cuda.current_device())
    assert ("cuda" in sf.available_backends()) == runs_here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_no_kernels_available_without_a_gpu(extension):
    assert extension.kernels_available(0) is False


def test_bad_dtype_code_is_a_value_error(extension):
    with pytest.raises(ValueError, match="dtype must be"):
        extension.PoolingArgs().dtype = 7


def test_unknown_kernel_kind_is_a_value_error(extension):
    with pytest.raises(ValueError, match="kind must be mean_forward"):
        extension.launch("median_forward", extension.PoolingArgs())


@pytest.mark.skipif(torch.cuda.is_available(), reason="would launch on null pointers")
def test_launch_failure_names_the_kernel(extension):
    args = extension.PoolingArgs()
    args.batch, args.seq_len, args.hidden, args.stride_x_batch, args.stride_x_seq = 2, 3, 32, 96, 32
    with pytest.raises(RuntimeError, match="max_pool_forward_kernel"):
        extension.launch("max_forward", args)


def test_explicit_cuda_backend_on_cpu_tensors_explains(extension):
    with pytest.raises(ValueError, match="need CUDA tensors"):
        sf.masked_mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3), backend="cuda")
