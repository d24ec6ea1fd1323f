"""The loss on a GPU, checked where a CPU can show it: every strategy computes the same function;
the ops issue no host synchronization; every Triton launch runs under the tensors' device; launch
grids stay within CUDA's limits; fp32 follows PyTorch's TF32 setting through both of its APIs;
``"auto"`` keeps the fastest strategy by timing (a fake timer here). The gpu-marked tests check
the same on a device: sync-debug mode, CUDA-graph capture, ``cuda:1``, each strategy in bf16."""

from __future__ import annotations

import contextlib

import pytest
import torch
from inputs import cpu_backends, random_embeddings, random_mask
from loss_checks import check_op, make_inputs, with_grads
from syncs import HostSyncDetector

import simcse_fast as sf
from simcse_fast import _checks, _triton, distributed, functional, pooling, reference, similarity
from simcse_fast.similarity import PASS_CONFIGS, fused, kernels, numerics, op, select

needs_interpreter = pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts with no timed choice and no pinned strategy."""
    monkeypatch.setattr(select, "_CHOICES", {})
    monkeypatch.delenv(select.STRATEGY_ENV_VAR, raising=False)


# Every strategy computes the same function.


PARITY_CASES = [
    ("info_nce", {}),
    ("info_nce", {"labels": "random"}),
    ("info_nce", {"symmetric": True, "chunk_mb": 0.05}),  # several chunks and dot sub-chunks
    ("info_nce", {"symmetric": True, "chunk_mb": 1000.0}),  # the forward's matrix kept
    ("similarity_logsumexp", {"exclude_diagonal": True, "chunk_mb": 0.05}),
]


@needs_interpreter
@pytest.mark.parametrize("loss, options", PARITY_CASES, ids=lambda o: str(o) if isinstance(o, dict) else o)
@pytest.mark.parametrize(
    "strategy, dtype",
    [("gemm", torch.float32), ("gemm", torch.float16), ("fused:128x128", torch.float16)],
    ids=["gemm-float32", "gemm-float16", "fused128x128-float16"],
)
def test_strategy_matches_reference(strategy, dtype, loss, options, monkeypatch, generator):
    """The tiles other than the default (which tests/test_similarity.py covers) and the gemm
    strategy against the float64 reference, over several key ranges (M > N) and chunks."""
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, strategy)
    n, m, d = 130, 300, 96
    queries, keys, scale = make_inputs(n, m, d, dtype, "cpu", generator)
    options = dict(options)
    if options.get("labels") == "random":
        options["labels"] = torch.randint(0, m, (n,), generator=generator)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    ours, ref = getattr(sf, loss), getattr(reference, loss)
    if "chunk_mb" in options:
        chunk_mb = options.pop("chunk_mb")

        def ours(q, k, *, _fn=ours, **kwargs):
            return _fn(q, k, chunk_mb=chunk_mb, **kwargs)

    check_op(
        ours,
        ref,
        queries,
        keys,
        scale,
        dtype,
        seed,
        f"{strategy} {loss} {options}",
        backend="triton",
        **options,
    )


@needs_interpreter
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
@pytest.mark.parametrize("strategy", ["fused", "gemm"])
def test_strategies_agree_on_the_sentence_transformers_layouts(
    strategy, partition_mode, monkeypatch, generator
):
    """Every direction, gathered queries (n_local < Nq) and two columns of documents: the Triton
    strategies give the torch path's loss and gradients (which tests/test_sentence_transformers.py
    holds to sentence-transformers' own)."""
    queries = random_embeddings((24, 40), torch.float32, generator)
    docs = random_embeddings((48, 40), torch.float32, generator)
    options = {"n_local": 16, "directions": sf.similarity.DIRECTIONS, "partition_mode": partition_mode}
    results = {}
    for name, backend in (("torch", "torch"), (strategy, "triton")):
        monkeypatch.setenv(select.STRATEGY_ENV_VAR, name)
        seed = torch.Generator().manual_seed(2)
        loss_fn = functional.in_batch_negatives_loss
        results[name] = with_grads(
            loss_fn, queries, docs, torch.tensor(20.0), seed, backend=backend, **options
        )
    (loss, grads, _), (expected_loss, expected_grads, _) = results[strategy], results["torch"]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# No host synchronization.


@pytest.mark.parametrize(
    "statement",
    [
        "x.sum().item()",
        "float(x.sum())",
        "torch.tensor(2.0, device=x.device) * x",
        "x[[0, 1]]",
        "x.nonzero()",
    ],
)
def test_the_detector_catches_host_synchronization(statement):
    with pytest.raises(AssertionError, match="host synchronization"), HostSyncDetector():
        eval(statement, {"torch": torch, "x": torch.ones(3, 4)})


@pytest.fixture
def device_value_checks(monkeypatch):
    """Value checks as on a GPU (device-side assertions) for CPU tensors."""
    monkeypatch.setattr(_checks, "reads_values_on_host", lambda tensor: False)
    monkeypatch.setattr(distributed, "reads_values_on_host", lambda tensor: False)


def _gist_options(generator) -> similarity.LossOptions:
    """A guide of 12 dimensions for 20 anchors and two columns of 20 documents."""
    return similarity.LossOptions(
        doc_block=20, guide_queries=random_embeddings((20, 12), torch.float32, generator),
        guide_docs=random_embeddings((40, 12), torch.float32, generator), margin=0.05,
    )  # fmt: skip


# mode -> (labels, n_local, (query_to_query, doc_to_query, doc_to_doc, joint, with_positive,
# exclude_diagonal), options)
OP_MODES = {
    "similarity_logsumexp": (False, 20, (False, False, False, False, False, False), None),
    "exclude_diagonal": (False, 20, (False, False, False, False, False, True), None),
    "info_nce": (False, 20, (False, False, False, False, True, False), None),
    "labels": (True, 20, (False, False, False, False, True, False), None),
    "symmetric": (False, 20, (False, True, False, False, True, False), None),
    "all_directions_joint_gathered": (False, 12, (True, True, True, True, True, False), None),
    "all_directions_per_direction": (False, 20, (True, True, True, False, True, False), None),
    "hardness_symmetric": (
        False,
        20,
        (False, True, False, False, True, False),
        lambda g: similarity.LossOptions(1, 5.0),
    ),
    "hardness_all_directions": (
        False,
        12,
        (True, True, True, True, True, False),
        lambda g: similarity.LossOptions(3, 9.0),
    ),
    "guided": (False, 20, (True, False, True, True, True, False), _gist_options),
}


@pytest.mark.parametrize("mode", list(OP_MODES))
@pytest.mark.parametrize("strategy", ["torch", "fused", "gemm"])
@pytest.mark.parametrize("budget", [1 << 30, 4096], ids=["kept", "chunked"])
def test_loss_op_issues_no_host_synchronization(strategy, mode, budget, generator):
    """The loss op's forward and backward, every mode and strategy, both with the N x M matrix
    kept and in chunks: no aten call that would wait for a GPU (the op's own implementation runs
    under the detector, below the dispatcher that hides it)."""
    if strategy != "torch" and "triton" not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    has_labels, n_local, flags, make_options = OP_MODES[mode]
    options = similarity.PLAIN if make_options is None else make_options(generator)
    queries = random_embeddings((20, 32), torch.float32, generator)
    docs = random_embeddings((40, 32), torch.float32, generator)
    scale = torch.full((), 20.0)
    labels = torch.randint(0, 40, (n_local,), generator=generator) if has_labels else None
    implementation = select._with_tile(strategy, 4)
    extra = options.op_args(queries.shape[0])
    with HostSyncDetector():
        loss, stats, kept = op.contrastive_loss_op._init_fn(
            queries, docs, scale, labels, n_local, *flags, implementation, budget, *extra
        )
        grads = op.contrastive_loss_backward_op._init_fn(
            torch.ones_like(loss), queries, docs, scale, labels, stats, kept, n_local, *flags,
            implementation, budget, *extra, True,
        )  # fmt: skip
    assert loss.isfinite().all() and all(grad.isfinite().all() for grad in grads)


@pytest.mark.usefixtures("device_value_checks")
@pytest.mark.parametrize("backend", cpu_backends())
def test_public_functions_issue_no_host_synchronization(backend, generator):
    """Argument checks, the scale, labels and offsets checked on the device, the ops through
    autograd, pooling padded and packed: forward and backward without a host synchronization."""
    anchors = random_embeddings((12, 16), torch.float32, generator).requires_grad_()
    candidates = random_embeddings((20, 16), torch.float32, generator).requires_grad_()
    labels = torch.randint(0, 20, (12,), generator=generator)
    x = random_embeddings((4, 7, 16), torch.float32, generator).requires_grad_()
    mask = random_mask(4, 7, "left", generator)
    tokens = random_embeddings((10, 16), torch.float32, generator).requires_grad_()
    offsets = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    scale = torch.tensor(20.0, requires_grad=True)
    with HostSyncDetector():
        total = (
            sf.info_nce(anchors, candidates, backend=backend)
            + sf.info_nce(anchors, candidates, labels=labels, scale=scale, backend=backend)
            + sf.info_nce(anchors, candidates[:12], symmetric=True, reduction="sum", backend=backend)
            + sf.similarity_logsumexp(anchors, candidates, exclude_diagonal=True, backend=backend).mean()
            + functional.in_batch_negatives_loss(
                anchors, candidates[:12], n_local=8, directions=sf.similarity.DIRECTIONS, backend=backend
            ).mean()
            + sf.masked_mean_pool(x, mask, backend=backend).sum()
            + sf.masked_max_pool(x, mask, backend=backend).sum()
            + sf.packed_mean_pool(tokens, offsets, backend=backend).sum()
            + sf.packed_max_pool(tokens, offsets, backend=backend).sum()
        )
        total.backward()
    assert total.isfinite()


def test_device_checks_still_refuse_bad_values(device_value_checks):
    """With the values checked on the device, a bad label or offset still fails, by the
    assertion (on a GPU: at the next synchronization)."""
    with pytest.raises(RuntimeError, match=r"labels must index candidates, in \[0, 6\)"):
        sf.info_nce(torch.randn(4, 8), torch.randn(6, 8), labels=torch.tensor([0, 1, 2, 6]))
    with pytest.raises(RuntimeError, match="cu_seqlens must hold sequence offsets"):
        sf.packed_mean_pool(torch.randn(5, 8), torch.tensor([0, 3, 4]))


def test_float_scale_is_filled_on_the_device():
    """A number becomes a tensor by a fill on the device, not a copy from the host."""
    with HostSyncDetector():
        scale = _checks.scale_tensor(20.0, torch.device("cpu"))
    assert scale.dtype == torch.float32 and scale.dim() == 0 and scale.item() == 20.0


# Launches under the tensors' device, grids within CUDA's limits.


def test_launch_device_makes_the_tensors_device_current():
    guard = _triton.launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_triton.launch_device(torch.device("cpu")), contextlib.nullcontext)


class _GuardRecorder:
    """Stands in for ``launch_device``: records the device each launch was guarded with."""

    def __init__(self):
        self.active = []
        self.guarded_launches = []

    @contextlib.contextmanager
    def __call__(self, device):
        self.active.append(device)
        try:
            yield
        finally:
            self.active.pop()


class _CheckedKernel:
    """A kernel whose launches assert that a device guard for their tensors' device is active."""

    def __init__(self, kernel, recorder):
        self.kernel, self.recorder = kernel, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = {arg.device for arg in args if isinstance(arg, torch.Tensor)}
            assert self.recorder.active, "a Triton launch outside launch_device"
            assert devices == {self.recorder.active[-1]}, (devices, self.recorder.active)
            self.recorder.guarded_launches.append(grid)
            return self.kernel[grid](*args, **kwargs)

        return launch


@needs_interpreter
@pytest.mark.parametrize("strategy", ["fused", "gemm"])
def test_every_triton_launch_runs_under_the_tensors_device(strategy, monkeypatch, generator):
    recorder = _GuardRecorder()
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, strategy)
    monkeypatch.setattr(fused, "launch_device", recorder)
    monkeypatch.setattr(pooling, "launch_device", recorder)
    for module, names in (
        (fused, ("_lse_partial_kernel", "_gradient_weights_kernel")),
        (pooling, ("_mean_pool_forward_kernel", "_max_pool_forward_kernel", "_mean_pool_backward_kernel",
                   "_max_pool_backward_kernel")),
    ):  # fmt: skip
        for name in names:
            monkeypatch.setattr(module, name, _CheckedKernel(getattr(module, name), recorder))
    anchors = random_embeddings((10, 16), torch.float32, generator).requires_grad_()
    x = random_embeddings((3, 5, 16), torch.float32, generator).requires_grad_()
    mask = random_mask(3, 5, "right", generator)
    total = sf.info_nce(anchors, anchors.detach() + 0.1, symmetric=True, backend="triton")
    total = (
        total
        + sf.masked_max_pool(x, mask, backend="triton").sum()
        + sf.masked_mean_pool(x, mask, backend="triton").sum()
    )
    total.backward()
    assert len(recorder.guarded_launches) >= 6


@pytest.mark.parametrize(
    "config", [*kernels.FUSED_CONFIGS[2], *kernels.FUSED_CONFIGS[4], *PASS_CONFIGS.values()]
)
def test_launch_grids_stay_within_cuda_limits(config):
    """At N = M = 10**7 (65,536 anchors with 150 hard negatives each reach M = 10**7): the
    forward's grid and the weights grid of a chunk of the default budget. Before, the weights
    grid put ceil(M / 64) = 156,250 column blocks on grid y, past CUDA's 65,535."""
    n = m = 10**7
    budget = numerics.memory_budget(None, n, m, 768)
    rows = numerics.budget_rows(budget, m * 2, n)
    grids = [kernels.forward_grid(n, m, config, 132)[0], kernels.weights_grid(rows, m, config)]
    grids.append(kernels.weights_grid(n, 64, config))  # all rows at once against few columns
    for grid in grids:
        assert all(0 < size <= limit for size, limit in zip(grid, kernels.CUDA_MAX_GRID, strict=False)), grid
    assert (
        pooling.pooling_grid(10**7, 1024, pooling.pooling_config("mean_forward", 10**7, 1024))[0] <= 2**31 - 1
    )


# fp32 follows PyTorch's TF32 setting, whichever API set it.


@pytest.fixture
def restore_fp32_precision():
    matmul_before, global_before = torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision
    yield
    torch.backends.fp32_precision = global_before
    torch.backends.cuda.matmul.fp32_precision = matmul_before


@pytest.mark.usefixtures("restore_fp32_precision")
@pytest.mark.parametrize(
    "setting, expected",
    [
        ("pass", "ieee"),
        ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
        ("torch.backends.fp32_precision = 'tf32'", "tf32"),
        (
            "torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'",
            "ieee",
        ),
        ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
        ("torch.set_float32_matmul_precision('high')", "tf32"),
    ],
)
def test_fp32_dot_precision_follows_both_tf32_apis(setting, expected):
    """PyTorch 2.9 and later raise on a read of ``allow_tf32`` once the new API set TF32; the
    kernels read the setting that reflects both APIs."""
    exec(setting)
    assert kernels.dot_precision(torch.float32) == expected
    assert kernels.dot_precision(torch.bfloat16) == "ieee"


@needs_interpreter
@pytest.mark.usefixtures("restore_fp32_precision")
def test_fp32_loss_runs_after_the_new_tf32_switch(generator):
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    anchors, candidates, _ = make_inputs(9, 14, 32, torch.float32, "cpu", generator)
    loss = sf.info_nce(anchors, candidates, backend="triton")
    expected = reference.info_nce(anchors.double(), candidates.double())
    torch.testing.assert_close(loss.double(), expected, rtol=2e-3, atol=2e-3)


# "auto" keeps the fastest strategy, timed once per bucket.


class _FakeTimer:
    """``select.time_ms`` that runs each candidate once and reports scripted times, in the order
    of ``select.candidates``; ``fail`` names candidates that raise instead."""

    def __init__(self, times: dict[str, float], fail=()):
        self.order = list(times)
        self.times, self.fail, self.calls = times, set(fail), []

    def __call__(self, run, device):
        name = self.order[len(self.calls)]
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name} does not fit")
        run()
        return self.times[name]


@pytest.fixture
def timed_on_cpu(monkeypatch):
    """Selection by timing for CPU tensors as for CUDA ones (the candidates run under the
    interpreter)."""
    if "triton" not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setattr(select, "_selects_by_timing", lambda device: True)
    # "auto" resolves to the Triton kernels as for CUDA tensors.
    monkeypatch.setattr(functional, "_loss_backend", lambda backend, *_: (backend or "auto", "triton"))

    def install(times, fail=()):
        timer = _FakeTimer(times, fail)
        monkeypatch.setattr(select, "time_ms", timer)
        return timer

    return install


def _loss(anchors, candidates, backend="auto"):
    anchors, candidates = anchors.clone().requires_grad_(), candidates.clone().requires_grad_()
    loss = sf.info_nce(anchors, candidates, backend=backend)
    loss.backward()
    return loss, anchors.grad, candidates.grad


def test_auto_times_the_candidates_once_and_keeps_the_fastest(timed_on_cpu, monkeypatch, generator):
    anchors, candidates, _ = make_inputs(20, 30, 24, torch.float32, "cpu", generator)
    timer = timed_on_cpu({"fused:64x64": 3.0, "gemm": 1.0, "torch": 2.0})
    assert select.candidates("auto", 4) == timer.order
    chosen = _loss(anchors, candidates)
    assert timer.calls == timer.order
    assert list(select.strategy_choices().values()) == ["gemm"]
    case = next(iter(select.strategy_choices()))
    assert "cpu float32" in case and "Nq<=32 Nd<=32 D<=32" in case and "forward+backward" in case
    again = _loss(anchors[:17], candidates[:29])  # the same bucket: no new timing
    assert len(timer.calls) == 3 and again[0].isfinite()
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, "gemm")
    pinned = _loss(anchors, candidates)
    for got, want in zip(chosen, pinned, strict=True):
        assert torch.equal(got, want)


def test_explicit_triton_times_only_the_triton_strategies(timed_on_cpu, generator):
    anchors, candidates, _ = make_inputs(20, 30, 24, torch.float32, "cpu", generator)
    timer = timed_on_cpu({"fused:64x64": 1.0, "gemm": 2.0})
    _loss(anchors, candidates, backend="triton")
    assert timer.calls == ["fused:64x64", "gemm"]
    assert list(select.strategy_choices().values()) == ["fused:64x64"]


def test_a_failing_candidate_is_skipped(timed_on_cpu, generator):
    anchors, candidates, _ = make_inputs(20, 30, 24, torch.float32, "cpu", generator)
    timed_on_cpu({"fused:64x64": 1.0, "gemm": 2.0, "torch": 3.0}, fail={"fused:64x64"})
    with pytest.warns(RuntimeWarning, match="loss strategy fused:64x64 failed while timing .* left out"):
        _loss(anchors, candidates)
    assert list(select.strategy_choices().values()) == ["gemm"]


def test_no_timing_while_compiling_or_capturing(timed_on_cpu, monkeypatch, generator):
    """Timing synchronizes: a compiled region or a CUDA-graph capture runs the earlier choice for
    the bucket, else the stated default, and times nothing."""
    anchors, candidates, _ = make_inputs(20, 30, 24, torch.float32, "cpu", generator)
    timer = timed_on_cpu({"fused:64x64": 1.0, "gemm": 2.0, "torch": 3.0})
    flags = (False, False, False, False, True, False)
    scale = torch.full((), 20.0)

    def choose():
        return select.choose_implementation(
            "auto", "triton", anchors, candidates, scale, None, 20, flags, 1 << 25
        )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose() == select.DEFAULT_STRATEGY and not timer.calls
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose() == select.DEFAULT_STRATEGY and not timer.calls
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert choose() == "fused:64x64" and len(timer.calls) == 3
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose() == "fused:64x64" and len(timer.calls) == 3  # the cached choice


@pytest.mark.parametrize(
    "value, backend, message",
    [
        ("fastest", "auto", "is not a loss strategy"),
        ("gemm:128x64", "auto", "is not a loss strategy"),
        ("fused:64x999", "auto", "is not a loss strategy"),
        ("torch", "triton", "contradicts backend='triton'"),
    ],
)
def test_bad_pinned_strategy(value, backend, message, monkeypatch):
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, value)
    if backend == "triton" and "triton" not in cpu_backends():
        pytest.skip("needs the Triton interpreter")
    with pytest.raises(ValueError, match=message):
        sf.info_nce(torch.randn(4, 8), torch.randn(4, 8), backend=backend)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "loss strategies here: torch; torch (the only strategy for CPU tensors)"),
        ("gemm", "gemm, pinned by SIMCSE_FAST_LOSS_STRATEGY for CUDA tensors (CPU tensors run torch)"),
        ("fastest", "is not a loss strategy"),
    ],
)
def test_info_states_the_loss_strategy(value, expected, monkeypatch, capsys):
    from simcse_fast import cli

    if value is not None:
        monkeypatch.setenv(select.STRATEGY_ENV_VAR, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info"]) == 0
    assert expected in capsys.readouterr().out


def test_pinned_strategy_takes_the_dtype_default_tile(monkeypatch):
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, "fused:128x128")
    assert select._with_tile(select.pinned_strategy(), 4) == "fused:64x64"
    assert select._with_tile(select.pinned_strategy(), 2) == "fused:128x128"


# On a GPU.


@pytest.fixture
def cuda_inputs(generator):
    def make(n=512, m=768, d=768, dtype=torch.bfloat16, device="cuda"):
        anchors = random_embeddings((n, d), dtype, generator).to(device)
        candidates = random_embeddings((m, d), dtype, generator).to(device)
        return anchors, candidates

    return make


def _all_modes(anchors, candidates, labels, x, mask, tokens, offsets):
    n = anchors.shape[0]
    return (
        sf.info_nce(anchors, candidates)
        + sf.info_nce(anchors, candidates, labels=labels)
        + sf.info_nce(anchors, candidates[:n], symmetric=True)
        + sf.similarity_logsumexp(anchors, candidates, exclude_diagonal=True).mean()
        + functional.in_batch_negatives_loss(
            anchors, candidates, n_local=n, directions=sf.similarity.DIRECTIONS
        ).mean()
        + sf.masked_mean_pool(x, mask).float().sum()
        + sf.masked_max_pool(x, mask).float().sum()
        + sf.packed_mean_pool(tokens, offsets).float().sum()
        + sf.packed_max_pool(tokens, offsets).float().sum()
    )


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "fused", "gemm", "torch"])
def test_no_host_synchronization_under_sync_debug_mode(strategy, monkeypatch, cuda_inputs, generator):
    """torch.cuda.set_sync_debug_mode("error") raises at any synchronizing call: every mode of the
    loss and the pooling ops, forward and backward (after a first call, which times "auto")."""
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, strategy)
    anchors, candidates = (t.requires_grad_() for t in cuda_inputs(n=256, m=512))  # two document columns
    labels = torch.randint(0, 512, (256,), generator=generator).cuda()
    x = random_embeddings((8, 32, 64), torch.bfloat16, generator).cuda().requires_grad_()
    mask = random_mask(8, 32, "right", generator).cuda()
    tokens = random_embeddings((40, 64), torch.bfloat16, generator).cuda().requires_grad_()
    offsets = torch.tensor([0, 10, 10, 40], dtype=torch.int32).cuda()
    _all_modes(anchors, candidates, labels, x, mask, tokens, offsets).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _all_modes(anchors, candidates, labels, x, mask, tokens, offsets).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "gemm", "torch"])
@pytest.mark.parametrize("options", [{}, {"symmetric": True}, {"labels": True}], ids=str)
def test_cuda_graph_capture_replays_forward_and_backward(
    strategy, options, monkeypatch, cuda_inputs, generator
):
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, strategy)
    anchors, candidates = cuda_inputs(n=512, m=512)
    if options.get("labels"):
        options = {"labels": torch.randint(0, 512, (512,), generator=generator).cuda()}
    static = [anchors.clone().requires_grad_(), candidates.clone().requires_grad_()]

    def step():
        for leaf in static:
            leaf.grad = None
        loss = sf.info_nce(*static, **options)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for leaf in static:
        leaf.grad = None
    with torch.cuda.graph(graph):
        captured_loss = sf.info_nce(*static, **options)
        captured_loss.backward()
    fresh = [random_embeddings(t.shape, t.dtype, generator).cuda() for t in static]
    for leaf, values in zip(static, fresh, strict=True):
        leaf.data.copy_(values)
    graph.replay()
    eager = [values.clone().requires_grad_() for values in fresh]
    eager_loss = sf.info_nce(*eager, **options)
    eager_loss.backward()
    assert torch.equal(captured_loss, eager_loss)
    for leaf, reference_leaf in zip(static, eager, strict=True):
        assert torch.equal(leaf.grad, reference_leaf.grad)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("strategy", ["fused", "gemm", "torch"])
def test_tensors_on_the_second_gpu_while_the_first_is_current(strategy, monkeypatch, cuda_inputs, generator):
    """The launches follow the tensors to cuda:1 (the same numbers as on the CPU) and leave
    device 0 current."""
    monkeypatch.setenv(select.STRATEGY_ENV_VAR, strategy)
    torch.cuda.set_device(0)
    anchors, candidates = cuda_inputs(n=64, m=100, d=64, device="cuda:1")
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    check_op(
        sf.info_nce, reference.info_nce, anchors, candidates, torch.tensor(20.0, device="cuda:1"),
        torch.bfloat16, seed, f"{strategy} on cuda:1",
    )  # fmt: skip
    x = random_embeddings((4, 9, 64), torch.bfloat16, generator).to("cuda:1")
    mask = random_mask(4, 9, "left", generator).to("cuda:1")
    torch.testing.assert_close(
        sf.masked_mean_pool(x, mask, backend="triton").cpu().double(),
        reference.masked_mean_pool(x.cpu().double(), mask.cpu()),
        rtol=1.6e-2, atol=1.6e-2,
    )  # fmt: skip
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "fused:128x128", "gemm", "torch"])
def test_each_strategy_in_bf16_within_twice_eager(strategy, monkeypatch, generator):
    """Easy positives at N = M = 4096 in bf16 (the interpreter cannot run bf16 dots): each
    strategy's gradients within twice eager PyTorch's error, row by row."""
    from test_loss_precision import check

    monkeypatch.setenv(select.STRATEGY_ENV_VAR, strategy)
    backend = "torch" if strategy == "torch" else "triton"
    check("cuda", backend, torch.bfloat16, 4096, 4096, generator, 1.0)
    check("cuda", backend, torch.bfloat16, 1024, 3072, generator, 1.0, symmetric=False, labels="shuffled")


@pytest.mark.gpu
def test_auto_selects_by_timing_on_a_gpu(cuda_inputs):
    anchors, candidates = (t.requires_grad_() for t in cuda_inputs(n=2048, m=2048))
    sf.info_nce(anchors, candidates).backward()
    choices = select.strategy_choices()
    assert len(choices) == 1
    assert next(iter(choices.values())) in select.candidates("auto", 2)
