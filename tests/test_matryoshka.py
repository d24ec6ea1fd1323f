"""The loss at several Matryoshka dimensions in one pass: against the float64 reference (the sum
over the dimensions of ``reference.info_nce`` on the truncated inputs) in every strategy and
layout; the drop-in ``MatryoshkaLoss`` against sentence-transformers' own over its MNRL and
CachedMNRL; half precision by the 2x-eager rule; ranks gathered over gloo; no host
synchronization (hardness weighting and GIST's guide included); torch.library's opcheck; the
argument checks. tests/test_hardness_and_gist.py holds the one pass over hardness weighting and
GIST to sentence-transformers' MatryoshkaLoss over those losses."""

from __future__ import annotations

import inspect
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from inputs import assert_within_eager, cpu_backends, random_embeddings
from loss_checks import FORWARD_TOLERANCE, GRADIENT_TOLERANCE, assert_close_scaled
from syncs import HostSyncDetector
from test_loss_strategies import OP_MODES, _CheckedKernel, _GuardRecorder

import simcse_fast as sf
from simcse_fast import functional, reference, similarity
from simcse_fast.similarity import matryoshka

needs_interpreter = pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")

# (strategy, backend, dtype): the gemm strategy runs the Triton kernels (the interpreter on a CPU);
# bf16 Triton dots are wrong in the interpreter, but this strategy has none (cuBLAS does the products).
STRATEGY_CASES = [("torch", "torch", torch.float32), ("torch", "torch", torch.float16)]
if "triton" in cpu_backends():
    STRATEGY_CASES += [("gemm", "triton", torch.float32), ("gemm", "triton", torch.float16)]


def summed_reference(dims, weights):
    """``sum_k w_k reference.info_nce(a[:, :d_k], c[:, :d_k])``: the specification."""

    def loss(anchors, candidates, *, scale, **kwargs):
        return sum(
            weight * reference.info_nce(anchors[:, :dim], candidates[:, :dim], scale=scale, **kwargs)
            for dim, weight in zip(dims, weights, strict=True)
        )

    return loss


def gradients(fn, tensors, scale, upstream_seed, **kwargs):
    """``fn``'s output and the gradients of ``<out, w>`` (random ``w``) in the tensors and scale."""
    leaves = [t.detach().clone().requires_grad_() for t in (*tensors, scale)]
    out = fn(*leaves[:-1], scale=leaves[-1], **kwargs)
    weight = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64
    )
    grads = torch.autograd.grad(out, leaves, weight.to(out.dtype))
    return out, grads, weight


def check_against_reference(
    anchors, candidates, dims, weights, backend, dtype, what, chunk_mb=None, **options
):
    """Loss and gradients of ``sf.info_nce`` with ``matryoshka_dims`` against the float64 sum.
    Gradients are compared at the magnitude of their terms: ``s sum_k |w_k| max(1 / |x[:d_k]|)``
    times the upstream gradient of a row."""
    scale = torch.tensor(20.0)
    inputs = (anchors.to(dtype), candidates.to(dtype))
    out, grads, weight = gradients(
        sf.info_nce, inputs, scale, 7, matryoshka_dims=dims, matryoshka_weights=weights, backend=backend,
        chunk_mb=chunk_mb, **options,
    )  # fmt: skip
    expected, expected_grads, _ = gradients(
        summed_reference(dims, weights), [t.double() for t in inputs], scale.double(), 7, **options
    )
    assert out.dtype == torch.float32
    assert_close_scaled(out, expected, FORWARD_TOLERANCE[dtype], f"{what} loss")
    both = torch.cat([t.double() for t in inputs])
    inverse = max(
        abs(w) * both[:, :dim].norm(dim=1).clamp_min(1e-12).reciprocal().max().item()
        for dim, w in zip(dims, weights, strict=True)
    )
    rows = anchors.shape[0] if options.get("reduction", "mean") == "mean" else 1
    size = 20.0 * inverse * weight.abs().max().item() / rows * len(dims)
    for name, grad, expected_grad in zip(("anchors", "candidates"), grads, expected_grads, strict=False):
        assert grad.dtype == dtype
        assert_close_scaled(grad, expected_grad, GRADIENT_TOLERANCE[dtype], f"{what} d{name}", size)
    assert_close_scaled(grads[-1], expected_grads[-1], GRADIENT_TOLERANCE[dtype], f"{what} dscale")
    return grads


REFERENCE_CASES = {
    # name: (N, M, D, dims, weights, info_nce options)
    "ragged-dims": (13, 29, 40, [40, 5, 33, 16], [1.5, 0.5, 2.0, 1.0], {}),
    "labels": (13, 29, 40, [8, 24, 40], [1.0, -0.5, 2.0], {"labels": "random"}),
    "symmetric-hard-negatives": (11, 19, 32, [32, 16, 8], None, {"symmetric": True}),
    "per-anchor": (9, 9, 24, [24, 12, 3], [1.0, 1.0, 0.0], {"reduction": "none"}),
    "one-dim-below-d": (10, 14, 40, [17], [2.0], {"reduction": "sum"}),
    "the-full-dim": (10, 14, 40, [40], None, {}),
}


@pytest.mark.parametrize(
    "strategy, backend, dtype", STRATEGY_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_info_nce_matches_the_summed_reference(case, strategy, backend, dtype, generator):
    n, m, d, dims, weights, options = REFERENCE_CASES[case]
    anchors = random_embeddings((n, d), torch.float64, generator)
    candidates = random_embeddings((m, d), torch.float64, generator)
    options = dict(options)
    if options.get("labels") == "random":
        options["labels"] = torch.randint(0, m, (n,), generator=generator)
    weights_or_ones = weights if weights is not None else [1.0] * len(dims)
    grads = check_against_reference(
        anchors, candidates, dims, weights_or_ones, backend, dtype, f"{strategy} {dtype} {case}", **options
    )
    if max(dims) < d:  # the columns past the largest dimension are in no loss
        assert not grads[0][:, max(dims) :].any() and not grads[1][:, max(dims) :].any()


@pytest.mark.parametrize(
    "strategy, backend, dtype", STRATEGY_CASES[::2], ids=lambda v: str(v).removeprefix("torch.")
)
def test_chunks_and_sub_blocks_give_the_same_loss(strategy, backend, dtype, monkeypatch, generator):
    """Several chunks of rows (a small budget) and, on the torch path, several sub-blocks in a
    chunk: the same loss and gradients as the reference."""
    monkeypatch.setattr(matryoshka, "SUB_BLOCK_ELEMENTS", 64)
    anchors = random_embeddings((37, 48), torch.float64, generator)
    candidates = random_embeddings((50, 48), torch.float64, generator)
    check_against_reference(
        anchors, candidates, [48, 7, 20], [1.0, 2.0, 0.5], backend, dtype, f"{strategy} chunked",
        labels=torch.randint(0, 50, (37,), generator=generator), chunk_mb=0.02,
    )  # fmt: skip


@pytest.mark.parametrize(
    "strategy, backend, dtype", STRATEGY_CASES[::2], ids=lambda v: str(v).removeprefix("torch.")
)
def test_logsumexp_layout_matches_the_summed_reference(strategy, backend, dtype, generator):
    """The op without a positive (``similarity_logsumexp``'s layout, the diagonal left out): the
    per-row weighted sum of ``reference.similarity_logsumexp`` over the prefixes, and its
    gradients."""
    if backend not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    queries = random_embeddings((12, 40), torch.float64, generator)
    keys = random_embeddings((30, 40), torch.float64, generator)
    dims, weights = [6, 23, 40], [1.0, 0.5, 2.0]
    flags = (False, False, False, False, False, True)

    def fused(q, k, *, scale):
        plain = similarity.PLAIN.op_args(12)
        return matryoshka.matryoshka_loss_op(
            q, k, scale, None, dims, weights, 12, *flags, strategy, 1 << 20, *plain
        )[0]

    def summed(q, k, *, scale):
        return sum(
            w * reference.similarity_logsumexp(q[:, :d], k[:, :d], scale=scale, exclude_diagonal=True)
            for d, w in zip(dims, weights, strict=True)
        )

    scale = torch.tensor(20.0)
    out, grads, _ = gradients(fused, (queries.to(dtype), keys.to(dtype)), scale, 5)
    expected, expected_grads, _ = gradients(
        summed, (queries.to(dtype).double(), keys.to(dtype).double()), scale.double(), 5
    )
    assert_close_scaled(out, expected, FORWARD_TOLERANCE[dtype], "logsumexp layout")
    for name, grad, want in zip(("queries", "keys", "scale"), grads, expected_grads, strict=True):
        assert_close_scaled(grad, want, GRADIENT_TOLERANCE[dtype], f"logsumexp layout d{name}", 20.0 * 3)


def summed_in_batch(queries, docs, dims, weights, **options):
    return sum(
        w * functional.in_batch_negatives_loss(queries[:, :d], docs[:, :d], backend="torch", **options)
        for d, w in zip(dims, weights, strict=True)
    )


@pytest.mark.parametrize("strategy, backend", [("torch", "torch"), ("gemm", "triton")])
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
def test_every_direction_with_gathered_queries(partition_mode, strategy, backend, generator):
    """All four directions, 24 queries of which 16 are this process's (the rest gathered from
    other ranks), two columns of documents: the sum of the single-dimension loss (which
    tests/test_sentence_transformers.py holds to sentence-transformers) over the dimensions."""
    if backend not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    queries = random_embeddings((24, 40), torch.float32, generator)
    docs = random_embeddings((48, 40), torch.float32, generator)
    dims, weights = [40, 9, 24], [1.0, 0.5, 2.0]
    options = {"n_local": 16, "directions": sf.similarity.DIRECTIONS, "partition_mode": partition_mode}
    scale = torch.tensor(20.0)

    def fused(q, k, *, scale):
        return functional.in_batch_negatives_loss(
            q, k, scale=scale, backend=backend, matryoshka_dims=dims, matryoshka_weights=weights, **options
        )

    def summed(q, k, *, scale):
        return summed_in_batch(q, k, dims, weights, scale=scale, **options)

    out, grads, _ = gradients(fused, (queries, docs), scale, 3)
    expected, expected_grads, _ = gradients(summed, (queries, docs), scale, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


# Half precision: the 2x-eager rule of tests/test_loss_precision.py.


def eager_matryoshka(anchors, candidates, *, scale, dims, weights):
    """As users write it: per dimension, normalize and multiply in the inputs' dtype,
    cross-entropy in fp32 (sentence-transformers' MatryoshkaLoss over MNRL)."""
    rows = torch.arange(anchors.shape[0])
    total = 0.0
    for dim, weight in zip(dims, weights, strict=True):
        unit_a, unit_c = F.normalize(anchors[:, :dim], dim=-1), F.normalize(candidates[:, :dim], dim=-1)
        logits = (scale.to(anchors.dtype) * (unit_a @ unit_c.T)).float()
        total = total + weight * F.cross_entropy(logits, rows)
    return total


def scaled_gradients(fn, anchors, candidates, loss_scale, **kwargs):
    leaves = [
        anchors.clone().requires_grad_(),
        candidates.clone().requires_grad_(),
        torch.tensor(20.0).requires_grad_(),
    ]
    (fn(leaves[0], leaves[1], scale=leaves[2], **kwargs) * loss_scale).backward()
    return [
        leaf.grad.double().reshape(leaf.shape[0] if leaf.dim() else 1, -1) / loss_scale for leaf in leaves
    ]


PRECISION_CASES = [
    ("torch", torch.float16, 2.0**14),
    ("torch", torch.float16, 1.0),
    ("torch", torch.bfloat16, 1.0),
]
if "triton" in cpu_backends():
    PRECISION_CASES.append(("triton", torch.float16, 2.0**14))


@pytest.mark.parametrize(
    "backend, dtype, loss_scale", PRECISION_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_half_precision_with_easy_positives_within_twice_eager(backend, dtype, loss_scale, generator):
    """SimCSE's easy positives (anchor + 0.35 N(0, 1) at D = 64: P_ii of 0.99+ at every prefix),
    fp16 with and without a loss scale and bf16: row errors of every gradient at most twice
    eager's, which runs sentence-transformers' way."""
    n = 128 if backend == "triton" else 512
    anchors = torch.randn(n, 64, generator=generator, dtype=torch.float64)
    candidates = torch.cat(
        [anchors + 0.35 * torch.randn(n, 64, generator=generator, dtype=torch.float64),
         torch.randn(n // 2, 64, generator=generator, dtype=torch.float64)]
    )  # fmt: skip
    anchors, candidates = anchors.to(dtype), candidates.to(dtype)
    dims, weights = (64, 32, 16, 8), (1.0, 1.0, 0.5, 0.25)
    truth = scaled_gradients(summed_reference(dims, weights), anchors.double(), candidates.double(), 1.0)
    eager = scaled_gradients(eager_matryoshka, anchors, candidates, loss_scale, dims=dims, weights=weights)
    ours = scaled_gradients(
        sf.info_nce, anchors, candidates, loss_scale, matryoshka_dims=dims, matryoshka_weights=weights,
        backend=backend,
    )  # fmt: skip
    what = f"{backend} {dtype} loss scale {loss_scale}"
    assert_within_eager(ours, eager, truth, dtype, loss_scale, what, ("anchors", "candidates", "scale"))


# The ops: no host synchronization, opcheck, launches under the tensors' device.

MODES = (
    "info_nce", "labels", "symmetric", "all_directions_joint_gathered", "exclude_diagonal",
    "hardness_symmetric", "hardness_all_directions", "guided",
)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", matryoshka.MATRYOSHKA_STRATEGIES)
def test_ops_issue_no_host_synchronization(strategy, mode, generator):
    """Both ops in chunks of rows, every layout, hardness weighting and the guide included."""
    if strategy == "gemm" and "triton" not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    has_labels, n_local, flags, make_options = OP_MODES[mode]
    options = similarity.PLAIN if make_options is None else make_options(generator)
    queries = random_embeddings((20, 32), torch.float32, generator)
    docs = random_embeddings((40, 32), torch.float32, generator)
    labels = torch.randint(0, 40, (n_local,), generator=generator) if has_labels else None
    scale, dims, weights = torch.full((), 20.0), [7, 16, 32], [1.0, 0.5, 2.0]
    extra = options.op_args(queries.shape[0])
    with HostSyncDetector():
        loss, stats = matryoshka.matryoshka_loss_op._init_fn(
            queries, docs, scale, labels, dims, weights, n_local, *flags, strategy, 4096, *extra
        )
        grads = matryoshka.matryoshka_loss_backward_op._init_fn(
            torch.ones_like(loss), queries, docs, scale, labels, stats, dims, weights, n_local, *flags,
            strategy, 4096, *extra, True,
        )  # fmt: skip
    assert loss.isfinite().all() and all(grad.isfinite().all() for grad in grads)


@pytest.mark.parametrize("strategy", matryoshka.MATRYOSHKA_STRATEGIES)
def test_ops_pass_opcheck(strategy, generator):
    """Schema, fake kernels, autograd registration and AOT dispatch of both ops."""
    if strategy == "gemm" and "triton" not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    queries = torch.randn(6, 20, generator=generator).requires_grad_()
    docs = torch.randn(12, 20, generator=generator).requires_grad_()
    scale = torch.tensor(20.0).requires_grad_()
    labels = torch.randint(0, 12, (6,), generator=generator)
    dims, weights = [5, 20], [1.0, 0.5]
    flags = (True, True, True, True, True, False)
    plain = similarity.PLAIN.op_args(6)
    forward = (queries, docs, scale, None, dims, weights, 4, *flags, strategy, 1 << 20, *plain)
    torch.library.opcheck(matryoshka.matryoshka_loss_op, forward)
    with_labels = (queries, docs, scale, labels, dims, weights, 6, False, False, False, False, True, False)
    torch.library.opcheck(matryoshka.matryoshka_loss_op, (*with_labels, strategy, 256, *plain))
    _, stats = matryoshka.matryoshka_loss_op(*forward)
    backward = (torch.ones(4), queries.detach(), docs.detach(), scale.detach(), None, stats, dims, weights, 4)
    torch.library.opcheck(
        matryoshka.matryoshka_loss_backward_op, (*backward, *flags, strategy, 1 << 20, *plain, True)
    )
    # GIST's layout: the guide's embeddings are tensor arguments without a gradient.
    guide = similarity.LossOptions(
        doc_block=6, guide_queries=torch.randn(6, 8, generator=generator),
        guide_docs=torch.randn(12, 8, generator=generator), margin=0.1,
    )  # fmt: skip
    gist_flags = (True, False, True, True, True, False)
    guided = (queries, docs, scale, None, dims, weights, 6, *gist_flags, strategy, 1 << 20, *guide.op_args(6))
    torch.library.opcheck(matryoshka.matryoshka_loss_op, guided)


@needs_interpreter
def test_every_triton_launch_runs_under_the_tensors_device(monkeypatch, generator):
    """The weights kernel and the forward pass kernel it reuses launch under ``launch_device``."""
    from simcse_fast.similarity import fused

    recorder = _GuardRecorder()
    for module in (fused, matryoshka):
        monkeypatch.setattr(module, "launch_device", recorder)
    monkeypatch.setattr(fused, "_lse_partial_kernel", _CheckedKernel(fused._lse_partial_kernel, recorder))
    kernel = _CheckedKernel(matryoshka._matryoshka_weights_kernel, recorder)
    monkeypatch.setattr(matryoshka, "_matryoshka_weights_kernel", kernel)
    anchors = random_embeddings((10, 16), torch.float32, generator).requires_grad_()
    loss = sf.info_nce(anchors, anchors.detach() + 0.1, matryoshka_dims=[8, 16], backend="triton")
    loss.backward()
    assert len(recorder.guarded_launches) == 3  # a forward launch per dimension, a weights launch


@pytest.mark.parametrize("loss", ["info_nce", "gist"])
def test_compiles_without_graph_breaks(loss, generator):
    """``torch.compile(fullgraph=True)`` traces through both ops: the same loss and gradients
    (GIST's guide included)."""
    torch._dynamo.reset()
    guide_anchors, guide_docs = (random_embeddings((6, 8), torch.float32, generator) for _ in range(2))

    def loss_fn(anchors, candidates):
        if loss == "gist":
            return functional.guided_in_batch_negatives_loss(
                anchors, candidates[:6], guide_anchors, guide_docs, n_positives=6, scale=20.0,
                matryoshka_dims=[4, 16], matryoshka_weights=[0.5, 1.0],
            ).mean()  # fmt: skip
        return sf.info_nce(anchors, candidates, matryoshka_dims=[4, 16], matryoshka_weights=[0.5, 1.0])

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    inputs = (
        random_embeddings((6, 16), torch.float32, generator),
        random_embeddings((9, 16), torch.float32, generator),
    )
    leaves = [[t.clone().requires_grad_() for t in inputs] for _ in range(2)]
    eager, traced = loss_fn(*leaves[0]), compiled(*leaves[1])
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    for eager_leaf, traced_leaf in zip(*leaves, strict=True):
        torch.testing.assert_close(traced_leaf.grad, eager_leaf.grad)


# Argument checks.


@pytest.mark.parametrize(
    "dims, weights, error, message",
    [
        ("64", None, TypeError, "matryoshka_dims must be a sequence of ints, got str"),
        (64, None, TypeError, "matryoshka_dims must be a sequence of ints, got int"),
        ([], None, ValueError, "matryoshka_dims must name at least one dimension"),
        ([8, 4.0], None, TypeError, "matryoshka_dims must hold ints; got 4.0"),
        ([8, True], None, TypeError, "matryoshka_dims must hold ints; got True"),
        ([8, 0], None, ValueError, r"matryoshka_dims must lie in \[1, 16\]"),
        (
            [8, 17],
            None,
            ValueError,
            r"matryoshka_dims must lie in \[1, 16\] \(the embedding size D\); got 17",
        ),
        ([8, 8], None, ValueError, "matryoshka_dims must be distinct"),
        ([8, 16], [1.0], ValueError, "matryoshka_weights must have one weight per dimension"),
        ([8, 16], [1.0, float("nan")], ValueError, "matryoshka_weights must be finite"),
        ([8, 16], [1.0, "2"], TypeError, "matryoshka_weights must hold real numbers"),
        ([8, 16], torch.ones(2), TypeError, "matryoshka_weights must be a sequence of numbers, got Tensor"),
        (None, [1.0], ValueError, "matryoshka_weights needs matryoshka_dims"),
    ],
)
def test_bad_matryoshka_arguments(dims, weights, error, message):
    anchors, candidates = torch.randn(4, 16), torch.randn(6, 16)
    with pytest.raises(error, match=message):
        sf.info_nce(anchors, candidates, matryoshka_dims=dims, matryoshka_weights=weights)
    with pytest.raises(error, match=message):
        functional.in_batch_negatives_loss(
            anchors, candidates[:4], n_local=4, matryoshka_dims=dims, matryoshka_weights=weights
        )
    with pytest.raises(error, match=message):
        functional.guided_in_batch_negatives_loss(
            anchors, candidates[:4], torch.randn(4, 8), torch.randn(4, 8), n_positives=4,
            matryoshka_dims=dims, matryoshka_weights=weights,
        )  # fmt: skip


def test_any_order_of_dimensions_and_numpy_values_give_the_same_loss(generator):
    numpy = pytest.importorskip("numpy")
    anchors, candidates = torch.randn(5, 16, generator=generator), torch.randn(7, 16, generator=generator)
    ascending = sf.info_nce(anchors, candidates, matryoshka_dims=[4, 16], matryoshka_weights=[2.0, 1.0])
    shuffled = sf.info_nce(
        anchors, candidates, matryoshka_dims=(numpy.int64(16), 4), matryoshka_weights=[1, numpy.float32(2.0)]
    )
    assert torch.equal(ascending, shuffled)


# sentence-transformers' MatryoshkaLoss.

st = pytest.importorskip("sentence_transformers")
from simcse_fast.sentence_transformers import losses  # noqa: E402
from simcse_fast.sentence_transformers._compat import st_losses  # noqa: E402

MNRL_ARGUMENTS = inspect.signature(st_losses.MultipleNegativesRankingLoss.__init__).parameters
DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]
OPTION_CASES = [{}] + [
    {"directions": directions, "partition_mode": mode}
    for directions in DIRECTION_SETS[1:]
    for mode in ("joint", "per_direction")
    if mode == "joint" or directions == DIRECTION_SETS[1]
]
MATRYOSHKA_CASES = {
    # name: MatryoshkaLoss arguments (the drop-in and sentence-transformers' take the same)
    "all-dims": {"matryoshka_dims": [24, 16, 8, 3]},
    "weights-and-two-dims-a-step": {
        "matryoshka_dims": [24, 16, 8, 3],
        "matryoshka_weights": [1, 2, 0.5, 3],
        "n_dims_per_step": 2,
    },
    "a-repeated-dim-below-d": {"matryoshka_dims": [16, 5, 16], "matryoshka_weights": [1.0, 0.5, 2.0]},
}


class EmbeddingColumns(torch.nn.Module):
    """A stand-in model whose features are the sentence embeddings themselves."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": features["embedding"]}

    def get_embedding_dimension(self) -> int:  # sentence-transformers >= 5.4 asks
        return self.dim

    get_sentence_embedding_dimension = get_embedding_dimension


def options_or_skip(options: dict) -> dict:
    missing = [name for name in options if name not in MNRL_ARGUMENTS]
    if missing:
        pytest.skip(f"this sentence-transformers' MultipleNegativesRankingLoss has no {', '.join(missing)}")
    return options


# Releases before the draw was sorted (3.4.1) cache the largest drawn dimension's embeddings in
# place in their forward: a draw in ascending order raises there ("cannot be greater than the
# model's embedding dimension"). The drop-in computes the drawn dimensions' loss; it is compared
# with those releases' own loss on the same draw, sorted as later releases sort it.
SORTS_THE_DRAW = "dim_indices.sort()" in inspect.getsource(st_losses.MatryoshkaLoss.forward)


def matryoshka_run(matryoshka_class, inner, columns, arguments, seed, sort_draw=False):
    """The loss, the gradients of the columns, and the next value of Python's ``random`` (which
    shows that the draw of dimensions consumed it as sentence-transformers does). ``sort_draw``
    on a release that does not sort its draw: sorted (the same random numbers consumed)."""
    loss = matryoshka_class(inner.model, inner, **arguments)
    leaves = [column.clone().requires_grad_() for column in columns]
    with pytest.MonkeyPatch.context() as patch:
        if sort_draw and not SORTS_THE_DRAW:
            sample = random.sample
            patch.setattr(random, "sample", lambda population, k: sorted(sample(population, k)))
        random.seed(seed)
        value = loss([{"embedding": leaf} for leaf in leaves], torch.empty(0))
    grads = torch.autograd.grad(value, leaves)
    return value, grads, random.random()


def assert_same_runs(ours, theirs):
    """The same draw of dimensions, the loss within 1e-5 and each gradient within twice the fp32
    tolerance of tests/loss_checks.py (2e-5 of the largest magnitude, at least 1): both are fp32
    computations, each within that tolerance of the float64 truth (weights of a few units take
    the gradients of either beyond a fixed 1e-5 of the other)."""
    assert ours[2] == theirs[2], "the draw of dimensions consumed Python's random differently"
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for index, (grad, expected) in enumerate(zip(ours[1], theirs[1], strict=True)):
        assert_close_scaled(grad, expected, 2 * GRADIENT_TOLERANCE[torch.float32], f"d column {index}")


@pytest.mark.parametrize("case", list(MATRYOSHKA_CASES))
@pytest.mark.parametrize("n_columns", [2, 3], ids=lambda n: f"{n - 2}-hard-negatives")
@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "-".join(map(str, o.values())) or "default")
def test_matryoshka_mnrl_matches_sentence_transformers(options, n_columns, case, generator):
    options = options_or_skip(options)
    columns = [torch.randn(6, 24, generator=generator) for _ in range(n_columns)]
    model = EmbeddingColumns(24)
    for seed in (0, 1):
        ours = matryoshka_run(
            losses.MatryoshkaLoss, losses.MultipleNegativesRankingLoss(model, **options), columns,
            MATRYOSHKA_CASES[case], seed,
        )  # fmt: skip
        theirs = matryoshka_run(
            st_losses.MatryoshkaLoss, st_losses.MultipleNegativesRankingLoss(model, **options), columns,
            MATRYOSHKA_CASES[case], seed, sort_draw=True,
        )  # fmt: skip
        assert_same_runs(ours, theirs)


def test_matryoshka_symmetric_mnrl_matches_sentence_transformers(generator):
    columns = [torch.randn(6, 24, generator=generator) for _ in range(2)]
    model = EmbeddingColumns(24)
    arguments = MATRYOSHKA_CASES["weights-and-two-dims-a-step"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ours_inner = losses.MultipleNegativesSymmetricRankingLoss(model)
        theirs_inner = st_losses.MultipleNegativesSymmetricRankingLoss(model)
    ours = matryoshka_run(losses.MatryoshkaLoss, ours_inner, columns, arguments, 5)
    theirs = matryoshka_run(st_losses.MatryoshkaLoss, theirs_inner, columns, arguments, 5, sort_draw=True)
    assert_same_runs(ours, theirs)


def test_matryoshka_runs_the_inner_loss_once(generator, monkeypatch):
    """One fused call for all dimensions, where sentence-transformers calls its loss per dimension."""
    calls = []
    fused = losses.fused_in_batch_negatives_loss

    def counted(*args, **kwargs):
        calls.append(kwargs["matryoshka_dims"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(losses, "fused_in_batch_negatives_loss", counted)
    columns = [torch.randn(6, 24, generator=generator) for _ in range(2)]
    model = EmbeddingColumns(24)
    inner = losses.MultipleNegativesRankingLoss(model)
    matryoshka_run(losses.MatryoshkaLoss, inner, columns, MATRYOSHKA_CASES["all-dims"], 0)
    assert [list(dims) for dims in calls] == [[24, 16, 8, 3]]
    assert inner._matryoshka is None  # the inner loss alone is the plain loss again
    value = inner([{"embedding": column} for column in columns], torch.empty(0))
    assert calls[-1] is None and value.dim() == 0


def test_unfusable_inner_losses_run_sentence_transformers(generator):
    """An inner loss with an option the fused op does not compute (its one warning), and a loss
    that is not one of the fused ones: sentence-transformers' MatryoshkaLoss, unchanged."""
    columns = [torch.randn(6, 24, generator=generator) for _ in range(2)]
    model = EmbeddingColumns(24)
    dot = {"similarity_fct": st.util.dot_score}
    arguments = MATRYOSHKA_CASES["all-dims"]
    with pytest.warns(UserWarning, match="similarity_fct"):
        ours = matryoshka_run(
            losses.MatryoshkaLoss, losses.MultipleNegativesRankingLoss(model, **dot), columns, arguments, 0
        )
    theirs = matryoshka_run(
        st_losses.MatryoshkaLoss, st_losses.MultipleNegativesRankingLoss(model, **dot), columns, arguments, 0
    )
    assert_same_runs(ours, theirs)
    plain = matryoshka_run(
        losses.MatryoshkaLoss, st_losses.MultipleNegativesRankingLoss(model), columns, arguments, 0
    )
    assert_same_runs(
        plain,
        matryoshka_run(
            st_losses.MatryoshkaLoss, st_losses.MultipleNegativesRankingLoss(model), columns, arguments, 0
        ),
    )


def test_constructor_and_config_are_sentence_transformers(generator):
    ours, theirs = (
        inspect.signature(cls.__init__) for cls in (losses.MatryoshkaLoss, st_losses.MatryoshkaLoss)
    )
    assert ours == theirs
    model = EmbeddingColumns(24)
    loss = losses.MatryoshkaLoss(
        model, losses.MultipleNegativesRankingLoss(model), [8, 24], n_dims_per_step=1
    )
    assert (
        loss.get_config_dict()
        == st_losses.MatryoshkaLoss(
            model, st_losses.MultipleNegativesRankingLoss(model), [8, 24], n_dims_per_step=1
        ).get_config_dict()
    )


def make_model(folder):
    from sentence_transformers import SentenceTransformer

    from simcse_fast.sentence_transformers._compat import st_modules

    transformer = st_modules.Transformer(str(folder))
    dimension = (
        getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    )
    model = SentenceTransformer(modules=[transformer, st_modules.Pooling(dimension())], device="cpu")
    model.eval()  # dropout off: both losses must see the same embeddings
    return model


def parameter_grads(model, loss, columns, seed):
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    model.zero_grad()
    random.seed(seed)
    value = loss([tokenize(column) for column in columns], torch.empty(0))
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads, random.random()


@pytest.mark.parametrize(
    "inner, arguments",
    [
        ("MultipleNegativesRankingLoss", {"matryoshka_dims": [32, 16, 5]}),
        ("CachedMultipleNegativesRankingLoss", {"matryoshka_dims": [32, 16, 5]}),
        ("CachedMultipleNegativesRankingLoss",
         {"matryoshka_dims": [32, 16, 8, 5], "matryoshka_weights": [1, 2, 0.5, 3], "n_dims_per_step": 2}),
    ],
    ids=["mnrl", "cached", "cached-weights-two-dims-a-step"],
)  # fmt: skip
def test_parameter_gradients_match_through_a_model(tiny_bert_dir, inner, arguments):
    """A tiny BERT, three columns of sentences: the loss and every parameter's gradient equal
    sentence-transformers', the cached loss included (its decorated calculate_loss draws the
    dimensions; releases before 5.x draw none there)."""
    from inputs import SENTENCES

    model = make_model(tiny_bert_dir)
    columns = [SENTENCES, SENTENCES[::-1], SENTENCES[1:] + SENTENCES[:1]]
    extra = {"mini_batch_size": 3} if inner.startswith("Cached") else {}
    results = []
    for module in (losses, st_losses):
        loss = module.MatryoshkaLoss(model, getattr(module, inner)(model, **extra), **arguments)
        results.append(parameter_grads(model, loss, columns, 4))
    (value, ours, ours_random), (expected, theirs, theirs_random) = results
    assert ours_random == theirs_random
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    # The untrained encoder gives every sentence nearly one embedding (cosines of 0.99): the
    # radial term of a prefix's gradient, a sum of W cos over a row whose W sums to 0, turns an
    # fp32 rounding of the cosines into 1e-6 of the row's gradient, and the parameters sum many
    # rows. The embeddings' own gradients match to 1e-5 (the tests above).
    for name in ours:
        error = (ours[name] - theirs[name]).abs().max().item()
        assert error <= 1e-4 * max(1.0, theirs[name].abs().max().item()), f"{name}: max error {error:.2e}"


# Gathered negatives: tests/test_distributed.py runs info_nce with matryoshka_dims over gloo ranks.


def test_gathered_drop_in_matches_sentence_transformers(generator, monkeypatch):
    """Rank 1 of 3, the other ranks' embeddings stubbed in (the local ones in another order, each
    row scaled: a function that commutes with truncating and normalizing, as real gathering
    does): the drop-in's loss and local gradients equal sentence-transformers'."""
    import sys

    from simcse_fast.sentence_transformers import losses as our_module

    options_or_skip({"gather_across_devices": True})
    their_module = sys.modules[st_losses.MultipleNegativesRankingLoss.__module__]

    def all_gather_with_grad(x):
        scales = torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None]
        others = [torch.roll(x.detach(), rank + 1, dims=0) * scales for rank in (0, 2)]
        return torch.cat([others[0], x, others[1]])

    for module in (our_module, their_module):
        monkeypatch.setattr(module, "all_gather_with_grad", all_gather_with_grad)
        monkeypatch.setattr(module, "get_rank", lambda: 1)
    columns = [torch.randn(6, 24, generator=generator) for _ in range(3)]
    model = EmbeddingColumns(24)
    arguments = MATRYOSHKA_CASES["weights-and-two-dims-a-step"]
    for options in ({}, {"directions": DIRECTION_SETS[1], "partition_mode": "per_direction"}):
        ours = matryoshka_run(
            losses.MatryoshkaLoss,
            losses.MultipleNegativesRankingLoss(model, gather_across_devices=True, **options), columns,
            arguments, 2,
        )  # fmt: skip
        theirs = matryoshka_run(
            st_losses.MatryoshkaLoss,
            st_losses.MultipleNegativesRankingLoss(model, gather_across_devices=True, **options), columns,
            arguments, 2,
        )  # fmt: skip
        assert_same_runs(ours, theirs)
