"""torch.compile(fullgraph=True) traces through the ops: no graph break, same numbers."""

from __future__ import annotations

import pytest
import torch
from inputs import cpu_backends, random_embeddings, random_mask

import simcse_fast as sf


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_pooling_compiles_without_graph_breaks(backend, compile_backend, layout, generator):
    torch._dynamo.reset()
    if layout == "padded":
        x = random_embeddings((4, 11, 40), torch.float32, generator)
        structure = random_mask(4, 11, "right", generator)
        mean_pool, max_pool = sf.masked_mean_pool, sf.masked_max_pool
    else:
        x = random_embeddings((20, 24), torch.float32, generator)
        structure = torch.tensor([0, 6, 6, 20], dtype=torch.int32)
        mean_pool, max_pool = sf.packed_mean_pool, sf.packed_max_pool

    def pool_both(x, structure):
        mean = mean_pool(x, structure, backend=backend)
        maximum = max_pool(x, structure, backend=backend)
        return (mean * 2 + maximum).sum()

    compiled = torch.compile(pool_both, fullgraph=True, backend=compile_backend)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    eager_loss = pool_both(x_eager, structure)
    compiled_loss = compiled(x_compiled, structure)
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


@pytest.mark.parametrize("layout", ["padded-d", "transposed"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_loss_compiles_with_the_real_gradient_layout(backend, compile_backend, layout, generator):
    """Inductor checks the strides the fake kernels promise against the real outputs: D = 20
    (padded to 32 inside the op) and a transposed input must give the same numbers as eager."""
    torch._dynamo.reset()
    if layout == "padded-d":
        anchors = random_embeddings((6, 20), torch.float32, generator)
    else:
        anchors = random_embeddings((32, 6), torch.float32, generator).T
    candidates = random_embeddings((9, anchors.shape[1]), torch.float32, generator)

    def loss_fn(a, c):
        return sf.info_nce(a, c, backend=backend) + sf.info_nce(a, c[:6], symmetric=True, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    leaves = [[t.detach().clone().requires_grad_() for t in (anchors, candidates)] for _ in range(2)]
    eager_loss, compiled_loss = loss_fn(*leaves[0]), compiled(*leaves[1])
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for eager_leaf, compiled_leaf in zip(*leaves, strict=True):
        torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


def test_backward_op_passes_opcheck(generator):
    """The backward op's fake kernel promises contiguous gradients of the inputs' shapes."""
    from simcse_fast import similarity

    queries = random_embeddings((32, 6), torch.float32, generator).T
    docs = random_embeddings((8, 20), torch.float32, generator)
    scale = torch.tensor(20.0)
    extra = similarity.PLAIN.op_args(6)
    _, stats, cache = similarity.contrastive_loss_op(
        queries, docs, scale, None, 6, False, True, False, False, True, False, "torch", 1 << 20, *extra
    )
    flags = (6, False, True, False, False, True, False, "torch", 1 << 20, *extra, True)
    args = (torch.ones(6), queries, docs, scale, None, stats, cache, *flags)
    torch.library.opcheck(similarity.contrastive_loss_backward_op, args)
