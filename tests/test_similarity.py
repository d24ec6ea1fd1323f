"""similarity_logsumexp and info_nce, every backend, forward and all three gradients, against the
float64 reference; bad input; memory; determinism."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from inputs import cpu_backends
from loss_checks import FORWARD_TOLERANCE, SHAPES, assert_close_scaled, check_op, make_inputs, with_grads

import simcse_fast as sf
from simcse_fast import reference

# The interpreter's tl.dot is wrong on bf16 operands (Triton 3.9): bf16 Triton runs on GPUs only.
CPU_CASES = [
    ("cpu", backend, dtype) for backend in cpu_backends() for dtype in (torch.float32, torch.float16)
]
CPU_CASES.append(("cpu", "torch", torch.bfloat16))
CASES = [pytest.param(*case, id=f"{case[0]}-{case[1]}-{str(case[2])[6:]}") for case in CPU_CASES] + [
    pytest.param("cuda", backend, dtype, marks=pytest.mark.gpu, id=f"cuda-{backend}-{str(dtype)[6:]}")
    for backend in ("torch", "triton")
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("device, backend, dtype", CASES)
@pytest.mark.parametrize("exclude_diagonal", [False, True])
@pytest.mark.parametrize("n, m, d", SHAPES)
def test_similarity_logsumexp_matches_reference(n, m, d, exclude_diagonal, device, backend, dtype, generator):
    queries, keys, scale = make_inputs(n, m, d, dtype, device, generator)
    check_op(
        sf.similarity_logsumexp, reference.similarity_logsumexp, queries, keys, scale, dtype,
        int(torch.randint(0, 2**31, (1,), generator=generator)), "similarity_logsumexp",
        exclude_diagonal=exclude_diagonal, backend=backend,
    )  # fmt: skip


INFO_NCE_OPTIONS = [
    {},
    {"symmetric": True},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"symmetric": True, "reduction": "none"},
    {"labels": "random"},
    {"labels": "random", "reduction": "none"},
]


@pytest.mark.parametrize("device, backend, dtype", CASES)
@pytest.mark.parametrize(
    "options", INFO_NCE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
@pytest.mark.parametrize("n, m, d", [(1, 1, 8), (37, 37, 384), (33, 97, 64), (130, 260, 768)])
def test_info_nce_matches_reference(n, m, d, options, device, backend, dtype, generator):
    anchors, candidates, scale = make_inputs(n, m, d, dtype, device, generator)
    options = dict(options)
    if options.get("labels") == "random":
        options["labels"] = torch.randint(0, m, (n,), generator=generator).to(device)
    check_op(
        sf.info_nce, reference.info_nce, anchors, candidates, scale, dtype,
        int(torch.randint(0, 2**31, (1,), generator=generator)), f"info_nce {options}",
        backend=backend, **options,
    )  # fmt: skip


@pytest.mark.parametrize("device, backend, dtype", CASES)
def test_float_scale_and_defaults(device, backend, dtype, generator):
    anchors, candidates, _ = make_inputs(6, 10, 16, dtype, device, generator)
    loss = sf.info_nce(anchors, candidates, scale=7, backend=backend)
    expected = reference.info_nce(anchors.double(), candidates.double(), scale=7.0)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close_scaled(loss, expected, FORWARD_TOLERANCE[dtype], "info_nce with an int scale")


@pytest.mark.parametrize("device, backend, dtype", CASES)
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_zero_rows_and_large_scale_stay_finite(scale, device, backend, dtype, generator):
    """A zero row has cosine 0 with everything (norm clamped at 1e-12, as F.normalize), and its
    gradient is 1/eps times a finite vector: about 1e13, beyond fp16's range only."""
    anchors, candidates, scale_t = make_inputs(9, 20, 48, dtype, device, generator, scale=scale)
    anchors[2] = 0
    candidates[5] = 0
    out, grads, _ = with_grads(
        sf.info_nce, anchors, candidates, scale_t, generator, backend=backend, reduction="none"
    )
    expected = reference.info_nce(anchors.double(), candidates.double(), scale=scale, reduction="none")
    assert out.isfinite().all()
    assert_close_scaled(out, expected, FORWARD_TOLERANCE[dtype], f"per-anchor loss, scale {scale}")
    nonzero_anchors = torch.ones(9, dtype=torch.bool)
    nonzero_anchors[2] = False
    nonzero_candidates = torch.ones(20, dtype=torch.bool)
    nonzero_candidates[5] = False
    assert grads[0][nonzero_anchors].isfinite().all() and grads[1][nonzero_candidates].isfinite().all()
    assert grads[2].isfinite()
    if dtype != torch.float16:
        assert grads[0].isfinite().all() and grads[1].isfinite().all()


@pytest.mark.parametrize("device, backend, dtype", CASES)
def test_nan_propagates(device, backend, dtype, generator):
    anchors, candidates, scale = make_inputs(5, 8, 16, dtype, device, generator)
    anchors[1, 3] = float("nan")
    per_anchor = sf.info_nce(anchors, candidates, scale=scale, reduction="none", backend=backend)
    assert per_anchor[1].isnan() and per_anchor[[0, 2, 3, 4]].isfinite().all()
    candidates[6, 0] = float("nan")
    assert sf.info_nce(anchors, candidates, scale=scale, reduction="none", backend=backend).isnan().all()


@pytest.mark.parametrize("device, backend, dtype", CASES)
def test_deterministic(device, backend, dtype, generator):
    anchors, candidates, scale = make_inputs(70, 150, 96, dtype, device, generator)
    runs = [
        with_grads(sf.info_nce, anchors, candidates, scale, torch.Generator().manual_seed(1), backend=backend)
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    for first, second in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("n, m", [(0, 0), (0, 5), (3, 0)])
@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_inputs(n, m, backend):
    lse = sf.similarity_logsumexp(torch.randn(n, 8), torch.randn(m, 8), backend=backend)
    assert lse.shape == (n,)
    assert torch.equal(lse, reference.similarity_logsumexp(torch.randn(n, 8), torch.randn(m, 8)))


def valid(n=4, m=6, d=8, **overrides):
    kwargs = {"anchors": torch.randn(n, d), "candidates": torch.randn(m, d)}
    kwargs.update(overrides)
    return kwargs


BAD_INFO_NCE = [
    (valid(anchors=torch.randn(4, 8, 1)), ValueError, "anchors must have 2 dimensions"),
    (valid(candidates=torch.randn(6)), ValueError, "candidates must have 2 dimensions"),
    (valid(anchors=[[1.0]]), TypeError, "anchors must be a torch.Tensor"),
    (valid(candidates=torch.randn(6, 9)), ValueError, "embedding size D = 8"),
    (valid(candidates=torch.randn(3, 8)), ValueError, "M >= N"),
    (valid(candidates=torch.randn(6, 8, dtype=torch.float16)), TypeError, "dtype of anchors"),
    (
        valid(anchors=torch.randn(4, 8).long(), candidates=torch.randn(6, 8).long()),
        TypeError,
        "anchors must have dtype",
    ),
    (
        valid(anchors=torch.randn(4, 8).double(), candidates=torch.randn(6, 8).double()),
        TypeError,
        "anchors must have dtype",
    ),
    (valid(candidates=torch.randn(6, 8, device="meta")), ValueError, "same device"),
    (valid(labels=torch.tensor([0, 1, 2, 6])), ValueError, r"labels must index candidates, in \[0, 6\)"),
    (valid(labels=torch.tensor([0, -1, 2, 3])), ValueError, "labels must index candidates"),
    (valid(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must have shape \(N,\) = \(4,\)"),
    (valid(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels must have 1 dimension,"),
    (valid(labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    (valid(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
    (valid(labels=torch.arange(4), symmetric=True), ValueError, "symmetric=True .* takes no labels"),
    (valid(reduction="avg"), ValueError, "reduction must be one of"),
    (valid(symmetric="yes"), TypeError, "symmetric must be a bool"),
    (valid(scale="20"), TypeError, "scale must be a float or a 0-dim tensor"),
    (valid(scale=torch.ones(2)), ValueError, "scale must be a float or a 0-dim tensor"),
    (valid(scale=torch.tensor(2)), TypeError, "scale must be a floating tensor"),
    (valid(backend="fastest"), ValueError, "backend must be one of"),
    (valid(backend="cuda"), ValueError, "there is no cuda kernel for info_nce"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_INFO_NCE)
def test_bad_info_nce_input(kwargs, error, message):
    anchors, candidates = kwargs.pop("anchors"), kwargs.pop("candidates")
    with pytest.raises(error, match=message):
        sf.info_nce(anchors, candidates, **kwargs)


@pytest.mark.parametrize(
    "queries, keys, kwargs, error, message",
    [
        (torch.randn(4, 8), torch.randn(3, 8), {"exclude_diagonal": True}, ValueError, "M >= N"),
        (torch.randn(4, 8), torch.randn(3, 7), {}, ValueError, "embedding size D = 8"),
        (torch.randn(4), torch.randn(3, 8), {}, ValueError, "queries must have 2 dimensions"),
        (
            torch.randn(4, 8),
            torch.randn(5, 8),
            {"exclude_diagonal": 1},
            TypeError,
            "exclude_diagonal must be a bool",
        ),
        (torch.randn(4, 8), torch.randn(5, 8).half(), {}, TypeError, "dtype of queries"),
    ],
)
def test_bad_similarity_input(queries, keys, kwargs, error, message):
    with pytest.raises(error, match=message):
        sf.similarity_logsumexp(queries, keys, **kwargs)


def test_explicit_triton_unavailable_raises(monkeypatch):
    from simcse_fast import _backends

    monkeypatch.setattr(_backends, "TRITON_INTERPRETER", False)
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        sf.info_nce(torch.randn(4, 8), torch.randn(4, 8), backend="triton")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch, simcse_fast as sf
    torch.manual_seed(0)
    n, d = 16384, 64
    anchors = torch.randn(n, d, requires_grad=True)
    candidates = torch.randn(n, d, requires_grad=True)
    warm = sf.info_nce(anchors[:64], candidates[:64], backend="torch")  # first-call allocations
    warm.backward()
    anchors.grad = candidates.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = sf.info_nce(anchors, candidates, backend="torch")
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_peak_bytes": (after - before) * 1024, "loss": loss.item()}))
    """
)


def test_torch_path_memory_stays_far_below_the_similarity_matrix():
    """N = M = 16384, D = 64: one N x M fp32 matrix is 1 GiB; forward + backward must add far
    less than that to the peak resident memory (inputs and gradients are 8 MiB)."""
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    one_matrix = 16384 * 16384 * 4
    assert result["extra_peak_bytes"] < one_matrix / 8, result
    assert 0 < result["loss"] < 20 + 16384**0.5, result


@pytest.mark.parametrize("backend", cpu_backends())
def test_info_nce_compiles_without_graph_breaks(backend, generator):
    torch._dynamo.reset()
    anchors, candidates, scale = make_inputs(12, 20, 24, torch.float32, "cpu", generator)
    scale.requires_grad_()

    def loss_fn(a, c, scale):
        return sf.info_nce(a, c, scale=scale, backend=backend) + sf.info_nce(
            a, c[:12], scale=scale, symmetric=True, backend=backend
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # raises on a graph break
    eager = with_grads(loss_fn, anchors, candidates, scale, torch.Generator().manual_seed(3))
    traced = with_grads(compiled, anchors, candidates, scale, torch.Generator().manual_seed(3))
    torch.testing.assert_close(traced[0], eager[0])
    for got, want in zip(traced[1], eager[1], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_large_batch_runs_in_linear_memory():
    """N = M = 65536 at D = 768 in bf16: the N x M fp32 matrix alone would be 16 GiB; at the
    default budget forward + backward add at most 1.5 GiB (inputs are 96 MiB each)."""
    n, d = 65536, 768
    anchors = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    candidates = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = sf.info_nce(anchors, candidates, backend="triton")
    loss.backward()
    extra = torch.cuda.max_memory_allocated() - base
    assert loss.isfinite() and anchors.grad.isfinite().all()
    assert extra <= 1.5 * 2**30, extra


@pytest.mark.parametrize("backend", cpu_backends())
def test_unaligned_views_give_the_aligned_result(backend, generator):
    """A view at an odd element offset (base pointer not 16-byte aligned) and a row stride that
    is not a multiple of 16 are copied to aligned storage: the kernels only ever see aligned
    rows, and the result is bitwise that of a contiguous copy."""
    n, m, d = 40, 70, 64
    storage = torch.randn(n * (d + 3) + 1, generator=generator).half()
    anchors = storage[1:].as_strided((n, d), (d + 3, 1))
    candidates = torch.randn(m, d, generator=generator).half()
    assert anchors.data_ptr() % 16 != 0
    leaves = [anchors.detach().clone().requires_grad_(), candidates.clone().requires_grad_()]
    strided = [
        storage.clone()[1:].as_strided((n, d), (d + 3, 1)).requires_grad_(),
        candidates.clone().requires_grad_(),
    ]
    losses = [sf.info_nce(*inputs, backend=backend) for inputs in (leaves, strided)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(leaves[0].grad, strided[0].grad) and torch.equal(leaves[1].grad, strided[1].grad)


@pytest.mark.parametrize("options", [{}, {"symmetric": True}, {"labels": "random"}], ids=str)
@pytest.mark.parametrize("chunk_mb", [0.001, 0.05, 1000.0])
@pytest.mark.parametrize("backend", cpu_backends())
def test_chunk_budget_changes_nothing_but_memory(chunk_mb, options, backend, generator):
    """A budget of a few rows per chunk, a few chunks, or everything at once: the same loss and
    gradients (the torch path keeps the cosines from the forward when they fit)."""
    anchors, candidates, scale = make_inputs(150, 150, 64, torch.float16, "cpu", generator)
    if options.get("labels") == "random":
        options = {"labels": torch.randint(0, 150, (150,), generator=generator)}
    seed = torch.Generator().manual_seed(5)
    default = with_grads(sf.info_nce, anchors, candidates, scale, seed, backend=backend, **options)
    seed = torch.Generator().manual_seed(5)
    chunked = with_grads(
        sf.info_nce, anchors, candidates, scale, seed, backend=backend, chunk_mb=chunk_mb, **options
    )
    runs = [default, chunked]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-6)
    for got, want in zip(runs[1][1], runs[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-6)


BAD_BUDGETS = [
    (0, ValueError, "positive"),
    (-1.0, ValueError, "positive"),
    ("8", TypeError, "number of MiB"),
    (float("nan"), ValueError, "positive"),
]


@pytest.mark.parametrize("value, error, message", BAD_BUDGETS)
def test_bad_chunk_budget(value, error, message):
    with pytest.raises(error, match=f"chunk_mb must be a .*{message}"):
        sf.info_nce(torch.randn(4, 8), torch.randn(4, 8), chunk_mb=value)


def test_bad_chunk_budget_environment(monkeypatch):
    monkeypatch.setenv("SIMCSE_FAST_LOSS_CHUNK_MB", "lots")
    with pytest.raises(ValueError, match="SIMCSE_FAST_LOSS_CHUNK_MB must be a positive number"):
        sf.info_nce(torch.randn(4, 8), torch.randn(4, 8))


IMPLEMENTATIONS = ["torch", *(["fused:64x64", "gemm"] if "triton" in cpu_backends() else [])]


@pytest.mark.parametrize("budget", [1 << 30, 256], ids=["matrix-kept", "chunked"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_contrastive_op_passes_opcheck(implementation, budget, generator):
    """Schema, fake kernel, autograd registration and AOT dispatch of the loss op, for a
    sentence-transformers layout (all directions, joint), labels, hardness weighting and a guide,
    each strategy."""
    from simcse_fast import similarity

    queries = torch.randn(6, 16, generator=generator).requires_grad_()
    docs = torch.randn(12, 16, generator=generator).requires_grad_()
    scale = torch.tensor(20.0).requires_grad_()
    labels = torch.randint(0, 12, (6,), generator=generator)
    plain = similarity.PLAIN.op_args(6)
    hardness = similarity.LossOptions(hardness=1, hardness_strength=5.0).op_args(6)
    guide = similarity.LossOptions(
        doc_block=6, guide_queries=torch.randn(6, 4, generator=generator),
        guide_docs=torch.randn(12, 4, generator=generator), margin=0.1,
    ).op_args(6)  # fmt: skip
    layouts = [  # (labels, n_local, the op's six flags, its trailing arguments)
        (None, 4, (True, True, True, True, True, False), plain),
        (labels, 6, (False, False, False, False, True, False), plain),
        (None, 6, (False, False, False, False, False, True), plain),
        (None, 6, (False, True, False, False, True, False), hardness),
        (None, 6, (True, False, True, True, True, False), guide),
    ]
    for row_labels, n_local, flags, extra in layouts:
        args = (queries, docs, scale, row_labels, n_local, *flags, implementation, budget, *extra)
        torch.library.opcheck(similarity.contrastive_loss_op, args)
