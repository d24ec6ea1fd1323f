"""pytest-benchmark suite for the CPU paths (not part of tests/): ``pytest benchmarks/``.

Compares the torch backend of each op with the eager reference at one training-like shape.
The full harness with ceilings and peers is ``simcse-fast bench``.
"""

import pytest
import torch

import simcse_fast as sf
from simcse_fast import reference


@pytest.fixture(scope="module")
def token_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, 384, generator=generator, requires_grad=True)
    lengths = torch.randint(1, 129, (64,), generator=generator)
    mask = torch.arange(128)[None, :] < lengths[:, None]
    return x, mask


@pytest.fixture(scope="module")
def embedding_pair():
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1024, 384, generator=generator, requires_grad=True),
        torch.randn(1024, 384, generator=generator, requires_grad=True),
    )


@pytest.mark.parametrize("pool", ["masked_mean_pool", "masked_max_pool"])
@pytest.mark.parametrize("impl", ["simcse_fast", "reference"])
def test_pooling_forward_backward(benchmark, token_batch, pool, impl):
    x, mask = token_batch
    fn = getattr(sf, pool) if impl == "simcse_fast" else getattr(reference, pool)
    benchmark.group = pool
    benchmark(lambda: fn(x, mask).sum().backward())


@pytest.mark.parametrize("impl", ["simcse_fast", "reference"])
def test_info_nce_forward_backward(benchmark, embedding_pair, impl):
    anchors, candidates = embedding_pair
    fn = sf.info_nce if impl == "simcse_fast" else reference.info_nce
    benchmark.group = "info_nce"
    benchmark(lambda: fn(anchors, candidates).backward())
