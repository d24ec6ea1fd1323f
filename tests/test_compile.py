"""torch.compile(fullgraph=True) traces through the ops: no graph break, same numbers."""

from __future__ import annotations

import pytest
import torch
from inputs import cpu_backends, random_embeddings, random_mask

import simcse_fast as sf


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_pooling_compiles_without_graph_breaks(backend, compile_backend, generator):
    torch._dynamo.reset()
    x = random_embeddings((4, 11, 40), torch.float32, generator)
    mask = random_mask(4, 11, "right", generator)

    def pool_both(x, mask):
        mean = sf.masked_mean_pool(x, mask, backend=backend)
        maximum = sf.masked_max_pool(x, mask, backend=backend)
        return (mean * 2 + maximum).sum()

    compiled = torch.compile(pool_both, fullgraph=True, backend=compile_backend)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    eager_loss = pool_both(x_eager, mask)
    compiled_loss = compiled(x_compiled, mask)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_custom_ops_pass_opcheck(generator):
    """torch.library's own consistency checks: schema, fake kernel, autograd registration."""
    from simcse_fast import pooling

    x = random_embeddings((3, 9, 20), torch.float32, generator).requires_grad_()
    mask = random_mask(3, 9, "left", generator)
    torch.library.opcheck(pooling.masked_mean_pool_op, (x, mask, "triton"))
    torch.library.opcheck(pooling.masked_max_pool_op, (x, mask, "triton"))
