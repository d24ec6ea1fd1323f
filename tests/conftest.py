"""Test setup: without a CUDA device the Triton kernels run under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so it is set here, before any
test module imports simcse_fast. On a machine with a GPU the kernels run for real and the
tests marked ``gpu`` run too.
"""

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import simcse_fast._triton as triton_support

SEED = int(os.environ.get("SIMCSE_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return (
        f"simcse_fast tests: random seed {SEED} (SIMCSE_FAST_TEST_SEED={SEED} repeats this run); "
        f"Triton interpreter {'on' if triton_support.TRITON_INTERPRETER else 'off'}"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def generator(request) -> torch.Generator:
    """A CPU generator seeded from the run's seed and the test's id: fresh inputs every run,
    reproducible with SIMCSE_FAST_TEST_SEED."""
    return torch.Generator().manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
