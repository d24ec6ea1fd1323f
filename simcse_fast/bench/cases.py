"""What the benchmark measures: per op family the shapes of each preset, the work model (bytes
a pooling pass must move, useful FLOPs of the loss) and the implementations timed side by side
(every simcse_fast backend that runs here and the peers a user would pick instead)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import available_backends, functional, reference, similarity
from .timing import Device

PASSES = ("forward", "backward", "forward+backward")

# Shapes per preset and device type: pooling and packed (B, L, H), loss (N, D) with M = N.
# --quick sweeps the loss over N = 512 .. 4096 at a small D on a CPU, so that its plots show
# eager's memory growing as N^2 next to ours, which stops growing once the chunked path takes
# over (N ~ 2900 at fp32): the reason to use simcse_fast. N = 8192 would cost two cores about
# 25 s more (an eager forward + backward takes ~1 s there), breaking --quick's minute.
# Packed pooling runs at SimCSE's shape (B = 512 sentences of up to 32 tokens, H = 768), on a
# CPU's --quick at H = 128: the eager max-pooling peers need ~0.1 s a run at H = 768.
PRESETS = {
    "quick": {
        "cpu": {
            "pooling": [(32, 128, 384)],
            "loss": [(512, 64), (1024, 64), (2048, 64), (4096, 64)],
            "packed": [(512, 32, 128)],
            "recipes": [(512, 64)],
        },
        "cuda": {
            "pooling": [(64, 128, 768), (256, 512, 1024)],
            "loss": [(512, 768), (4096, 768), (32768, 768)],
            "packed": [(512, 32, 768), (256, 512, 1024)],
            "recipes": [(4096, 768)],
        },
    },
    "default": {
        "cpu": {
            "pooling": [(32, 128, 384), (64, 256, 768)],
            "loss": [(512, 384), (2048, 768)],
            "packed": [(512, 32, 768)],
            "recipes": [(1024, 128), (4096, 768)],
        },
        "cuda": {
            "pooling": [(64, 128, 768), (128, 256, 1024), (256, 512, 1024)],
            "loss": [(n, d) for d in (384, 768, 1024) for n in (512, 4096, 32768)],
            "packed": [(512, 32, 768), (256, 512, 1024)],
            "recipes": [(4096, 768), (32768, 768)],
        },
    },
    "full": {
        "cpu": {
            "pooling": [(32, 128, 384), (64, 256, 768), (128, 512, 1024)],
            "loss": [(n, d) for d in (384, 768) for n in (512, 2048, 8192)],
            "packed": [(512, 32, 768), (128, 512, 1024)],
            "recipes": [(1024, 128), (4096, 768), (8192, 768)],
        },
        "cuda": {
            "pooling": [
                (64, 128, 768),
                (128, 256, 1024),
                (256, 512, 1024),
                (512, 512, 1024),
                (1024, 512, 1024),
            ],
            "loss": [(512 * 2**k, d) for d in (384, 768, 1024) for k in range(12)],
            "packed": [(512, 32, 768), (256, 512, 1024), (1024, 512, 1024)],
            "recipes": [(4096, 768), (32768, 768), (65536, 768)],
        },
    },
}

NM_PEER_BUFFERS = 6
"""N x M fp32 matrices the loss peers that build the similarity matrix (the eager reference,
its torch.compile, sentence-transformers) hold at their peak: logits, softmax, their gradients
and temporaries. Measured on a CPU at D = 64 (fp32): the eager reference 6.5 at N = 512, 5.2
at 2048, 4.0 at 4096 and 8192, sentence-transformers 4.0 at 8192; the larger figure keeps the
estimate on the safe side."""

DISPATCH_SHAPE = (1, 1, 8)
"""(B, L, H) of the tiny ``masked_mean_pool`` call whose time is the per-call overhead."""

QUICK_SKIPS_COMPILE = "skipped by --quick (compilation takes longer than the run)"

QUICK_SKIPS_CHUNKED = "skipped by --quick on a CPU (its chunked path takes seconds a call at N = 4096 there)"

COMPILE_BACKEND = "inductor"
"""The ``torch.compile`` backend of the compiled peers. ``"eager"`` traces without generating
code: the GPU check's dry run uses it to exercise those peers within its minute."""


def pooling_bytes(batch: int, seq_len: int, hidden: int, element_size: int, mask_element_size: int = 1):
    """Bytes a pooling pass must move, by pass: the forward reads the token embeddings and the
    mask and writes the pooled rows; the backward reads the output gradient and the mask and
    writes the token gradient."""
    tokens = batch * seq_len * hidden * element_size
    mask = batch * seq_len * mask_element_size
    pooled = batch * hidden * element_size
    forward = tokens + mask + pooled
    backward = pooled + mask + tokens
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def packed_pooling_bytes(n_tokens: int, batch: int, hidden: int, element_size: int, offset_size: int = 4):
    """Bytes a packed pooling pass must move, by pass: the forward reads the ``T`` present
    tokens and the ``B + 1`` offsets and writes the pooled rows; the backward reads the output
    gradient and the offsets and writes the token gradient. Padding is not counted: the padded
    op given the same sentences has this much useful work too."""
    tokens = n_tokens * hidden * element_size
    offsets = (batch + 1) * offset_size
    pooled = batch * hidden * element_size
    forward = tokens + offsets + pooled
    backward = pooled + offsets + tokens
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def loss_flops(n: int, m: int, d: int):
    """Useful FLOPs of the loss by pass: ``2NMD`` for the similarity matrix in the forward,
    ``4NMD`` for its two gradient products in the backward."""
    return {"forward": 2 * n * m * d, "backward": 4 * n * m * d, "forward+backward": 6 * n * m * d}


@dataclasses.dataclass
class Case:
    """One implementation of one op at one shape: ``make_inputs()`` builds fresh leaf tensors
    (requiring grad), ``run(*inputs)`` returns the output whose backward is timed.
    ``memory_need`` estimates its peak bytes where they grow faster than its inputs (``None``:
    no estimate); a case whose estimate exceeds the run's memory budget is skipped.
    ``environment``: variables set while the case is measured (a pinned loss strategy)."""

    op: str
    impl: str
    shape: dict
    make_inputs: Callable[[], list[torch.Tensor]]
    run: Callable[..., torch.Tensor]
    memory_need: int | None = None
    environment: dict[str, str] | None = None


class _Inputs:
    """Random tensors of one shape set, drawn from one seeded generator on the device."""

    def __init__(self, device: Device, dtype: torch.dtype):
        self.device, self.dtype = device.device, dtype
        self.generator = torch.Generator(device=device.device)
        self.generator.manual_seed(0)

    def randn(self, *size: int) -> torch.Tensor:
        """Standard normal values of this size in the benchmark dtype."""
        values = torch.randn(*size, generator=self.generator, device=self.device, dtype=torch.float32)
        return values.to(self.dtype)

    def leaves(self, *size: int) -> Callable[[], list[torch.Tensor]]:
        """``make_inputs`` for a case with one input of this size."""
        return lambda: [self.randn(*size).requires_grad_()]

    def lengths(self, batch: int, seq_len: int) -> torch.Tensor:
        """Sequence lengths uniform in 1 .. seq_len, as a batch of sentences has them."""
        return torch.randint(1, seq_len + 1, (batch,), generator=self.generator, device=self.device)


def _runnable_backends(probe, device: Device, suffix: str = "") -> tuple[list[str], dict]:
    """The simcse_fast backends that run an op here, and why the others do not, keyed by
    ``simcse_fast[backend]`` + ``suffix``: ``probe(backend)`` calls the op on tiny inputs, and an
    explicit backend that cannot run raises ``ValueError`` saying why. The Triton interpreter
    (CPU tensors in the tests) is a test tool, never benchmarked."""
    backends, missing = [], {}
    for backend in available_backends():
        if backend == "triton" and not device.is_cuda:
            continue
        try:
            probe(backend)
        except ValueError as error:
            missing[f"simcse_fast[{backend}]{suffix}"] = str(error)
            continue
        backends.append(backend)
    return backends, missing


def _our_cases(op: str, shape: dict, make_inputs, run_with, probe, device: Device, suffix: str = ""):
    """A case per simcse_fast backend that runs ``op`` here (``run_with(backend)`` is its run
    function) and why the other backends do not (see ``_runnable_backends``)."""
    backends, missing = _runnable_backends(probe, device, suffix)
    cases = [
        Case(op, f"simcse_fast[{backend}]{suffix}", shape, make_inputs, run_with(backend))
        for backend in backends
    ]
    return cases, missing


def _padded_probe(op: str, inputs: _Inputs):
    """Calls padded pooling ``op`` on a (2, 3, 8) batch with a given backend."""
    tokens, mask = inputs.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool, device=inputs.device)
    return lambda backend: getattr(functional, op)(tokens, mask, backend=backend)


def _compiled(fn):
    """``torch.compile(fn)`` with ``COMPILE_BACKEND``, made at the first call (building the cases
    imports no compiler) and compiled there, in the untimed warm-up."""
    compiled = None

    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, backend=COMPILE_BACKEND)
        return compiled(*args, **kwargs)

    return run


def _sentence_transformers() -> tuple[object, object, str | None]:
    """(losses, modules) of the installed sentence-transformers, or the reason they are missing."""
    try:
        from ..sentence_transformers._compat import st_losses, st_modules
    except Exception as error:  # any import failure means the peer is missing
        return None, None, f"sentence-transformers not importable ({error})"
    return st_losses, st_modules, None


def _inf_cl_loss() -> tuple[object, str | None]:
    """inf_cl's loss function, or the reason it is missing."""
    try:
        from inf_cl import cal_inf_loss
    except Exception as error:  # any import failure means the peer is missing
        return None, f"inf_cl not importable ({error})"
    return cal_inf_loss, None


def build_pooling(op: str, shape: tuple, dtype: torch.dtype, device: Device, compile_peers: bool, *,
                  wanted: Callable[[str], bool] | None = None):  # fmt: skip
    """``masked_mean_pool`` / ``masked_max_pool`` of a padded (B, L, H) batch with random
    lengths: our backends, the eager reference, its torch.compile and sentence-transformers'
    Pooling (imported only where ``wanted``, an implementation-name filter, lets it run)."""
    batch, seq_len, hidden = shape
    inputs = _Inputs(device, dtype)
    mask = torch.arange(seq_len, device=device.device)[None, :] < inputs.lengths(batch, seq_len)[:, None]
    shape_dict = {"B": batch, "L": seq_len, "H": hidden}
    make_inputs = inputs.leaves(batch, seq_len, hidden)

    def run_with(backend):
        return functools.partial(getattr(functional, op), attention_mask=mask, backend=backend)

    cases, missing = _our_cases(op, shape_dict, make_inputs, run_with, _padded_probe(op, inputs), device)
    ref = functools.partial(getattr(reference, op), attention_mask=mask)
    cases.append(Case(op, "reference (eager)", shape_dict, make_inputs, ref))
    if compile_peers:
        cases.append(Case(op, "reference (torch.compile)", shape_dict, make_inputs, _compiled(ref)))
    else:
        missing["reference (torch.compile)"] = QUICK_SKIPS_COMPILE
    if wanted is not None and not wanted("sentence-transformers Pooling"):
        return cases, missing
    _, st_modules, reason = _sentence_transformers()
    if st_modules is None:
        missing["sentence-transformers Pooling"] = reason
        return cases, missing
    mode = "mean" if op == "masked_mean_pool" else "max"
    module = st_modules.Pooling(hidden, pooling_mode=mode).to(device.device)

    def st_pool(x):
        return module({"token_embeddings": x, "attention_mask": mask.long()})["sentence_embedding"]

    cases.append(Case(op, "sentence-transformers Pooling", shape_dict, make_inputs, st_pool))
    return cases, missing


def build_packed(op: str, shape: tuple, dtype: torch.dtype, device: Device, compile_peers: bool, *,
                 wanted: Callable[[str], bool] | None = None):  # fmt: skip
    """``packed_mean_pool`` / ``packed_max_pool`` of B sentences of random lengths up to L,
    packed back to back (T tokens, int32 offsets): our backends, the padded op of the same
    sentences as a (B, L, H) batch, and the eager reference. ``compile_peers`` and ``wanted``
    are unused: the packed ops are compared with the padded ones, not with a compiled
    reference, and no peer is expensive to build."""
    batch, seq_len, hidden = shape
    inputs = _Inputs(device, dtype)
    lengths = inputs.lengths(batch, seq_len)
    n_tokens = int(lengths.sum())
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    mask = torch.arange(seq_len, device=device.device)[None, :] < lengths[:, None]
    shape_dict = {"B": batch, "L": seq_len, "H": hidden, "T": n_tokens}
    padded_op = op.replace("packed_", "masked_")
    probe_tokens = inputs.randn(5, 8)
    probe_offsets = torch.tensor([0, 2, 5], dtype=torch.int32, device=device.device)

    def packed_with(backend):
        return functools.partial(getattr(functional, op), cu_seqlens=cu_seqlens, backend=backend)

    def padded_with(backend):
        return functools.partial(getattr(functional, padded_op), attention_mask=mask, backend=backend)

    cases, missing = _our_cases(
        op, shape_dict, inputs.leaves(n_tokens, hidden), packed_with,
        lambda backend: getattr(functional, op)(probe_tokens, probe_offsets, backend=backend), device,
    )  # fmt: skip
    padded_cases, padded_missing = _our_cases(
        op, shape_dict, inputs.leaves(batch, seq_len, hidden), padded_with, _padded_probe(padded_op, inputs),
        device, suffix=f" {padded_op} (padded)",
    )  # fmt: skip
    ref = functools.partial(getattr(reference, op), cu_seqlens=cu_seqlens)
    eager = Case(op, "reference (eager)", shape_dict, inputs.leaves(n_tokens, hidden), ref)
    return [*cases, *padded_cases, eager], {**missing, **padded_missing}


def _strategy_cases(shape_dict: dict, make_pair, device: Device) -> list[Case]:
    """A case per loss strategy that runs on the device, pinned through
    ``similarity.STRATEGY_ENV_VAR`` (``simcse_fast[fused]``, ...), and where there is a choice,
    ``simcse_fast[auto]``: the strategy ``"auto"`` picks (``similarity.strategy_choices()``)."""
    strategies = similarity.loss_strategies(device.device)
    cases = [
        Case("info_nce", f"simcse_fast[{strategy}]", shape_dict, make_pair, functional.info_nce,
             environment={similarity.STRATEGY_ENV_VAR: strategy})
        for strategy in strategies
    ]  # fmt: skip
    if len(strategies) > 1:
        auto = {similarity.STRATEGY_ENV_VAR: "auto"}
        cases.append(Case("info_nce", "simcse_fast[auto]", shape_dict, make_pair, functional.info_nce,
                          environment=auto))  # fmt: skip
    return cases


def _linear_cross_entropy_case(shape_dict: dict, make_pair, scale: float) -> tuple[Case | None, str | None]:
    """PyTorch's chunked ``F.linear_cross_entropy`` as the one-direction InfoNCE,
    ``linear_cross_entropy(scale * unit(q), unit(k), arange(N))``, or why it is missing."""
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None, f"torch {torch.__version__} has no chunked F.linear_cross_entropy (PyTorch >= 2.13)"
    options = torch.nn.LinearCrossEntropyOptions()

    def linear_cross_entropy(anchors, candidates):
        labels = torch.arange(anchors.shape[0], device=anchors.device)
        unit_a, unit_c = F.normalize(anchors, dim=-1), F.normalize(candidates, dim=-1)
        return F.linear_cross_entropy(scale * unit_a, unit_c, labels, options=options)

    return Case("info_nce", "torch linear_cross_entropy", shape_dict, make_pair, linear_cross_entropy), None


def build_loss(op: str, shape: tuple, dtype: torch.dtype, device: Device, compile_peers: bool, *,
               wanted: Callable[[str], bool] | None = None):  # fmt: skip
    """``info_nce`` of N anchors against M = N candidates of dimension D: our loss strategies
    (each pinned, and ``"auto"`` where there is a choice), the eager reference, its
    torch.compile, PyTorch's chunked ``F.linear_cross_entropy`` (where present; not in a CPU's
    ``--quick``), sentence-transformers' MultipleNegativesRankingLoss and inf_cl (on a GPU,
    where installed). ``compile_peers``: whether the slow peers (the compiled reference, the
    chunked loss on a CPU) are timed; sentence-transformers and inf_cl are imported only where
    ``wanted`` (an implementation-name filter) lets them run."""
    n, d = shape
    inputs = _Inputs(device, dtype)
    shape_dict = {"N": n, "M": n, "D": d}
    matrix_need = NM_PEER_BUFFERS * n * n * 4

    def make_pair():
        return [inputs.randn(n, d).requires_grad_(), inputs.randn(n, d).requires_grad_()]

    cases, missing = _strategy_cases(shape_dict, make_pair, device), {}
    cases.append(Case(op, "reference (eager)", shape_dict, make_pair, reference.info_nce, matrix_need))
    if compile_peers:
        compiled = _compiled(reference.info_nce)
        cases.append(Case(op, "reference (torch.compile)", shape_dict, make_pair, compiled, matrix_need))
    else:
        missing["reference (torch.compile)"] = QUICK_SKIPS_COMPILE
    chunked, reason = _linear_cross_entropy_case(shape_dict, make_pair, scale=20.0)
    if chunked is not None and not compile_peers and not device.is_cuda:
        chunked, reason = None, QUICK_SKIPS_CHUNKED
    if chunked is None:
        missing["torch linear_cross_entropy"] = reason
    else:
        cases.append(chunked)
    peers = {"sentence-transformers MNRL": _mnrl_case, "inf_cl": _inf_cl_case}
    for name, build_peer in peers.items():
        if wanted is None or wanted(name):
            case, reason = build_peer(shape_dict, make_pair, device, matrix_need)
            if case is None:
                missing[name] = reason
            else:
                cases.append(case)
    return cases, missing


def _mnrl_case(shape_dict: dict, make_pair, device: Device, matrix_need: int):
    """sentence-transformers' MultipleNegativesRankingLoss on the embeddings, or why it is missing."""
    st_losses, _, reason = _sentence_transformers()
    if st_losses is None:
        return None, reason
    mnrl = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)

    def st_info_nce(anchors, candidates):
        return mnrl.compute_loss_from_embeddings([anchors, candidates], None)

    name = "sentence-transformers MNRL"
    return Case("info_nce", name, shape_dict, make_pair, st_info_nce, matrix_need), None


def _inf_cl_case(shape_dict: dict, make_pair, device: Device, matrix_need: int):
    """inf_cl's loss on unit rows (a GPU only), or why it is missing."""
    inf_cl, reason = _inf_cl_loss()
    if inf_cl is None:
        return None, reason
    if not device.is_cuda:
        return None, "needs a CUDA device"
    d = shape_dict["D"]
    head_dim = next(size for size in (256, 128, 64, 32, 16, d) if d % size == 0)
    scale = torch.tensor(20.0, device=device.device)

    def inf_cl_info_nce(anchors, candidates):
        unit_a, unit_c = F.normalize(anchors, dim=-1), F.normalize(candidates, dim=-1)
        return inf_cl(unit_a, unit_c, scale=scale, head_dim=head_dim)

    return Case("info_nce", "inf_cl", shape_dict, make_pair, inf_cl_info_nce), None


HARDNESS = {"hardness_mode": "all_negatives", "hardness_strength": 5.0}
"""The hardness case: EmbeddingGemma's strength on every negative, a hard negative per query."""

GIST_TEMPERATURE = 0.01
"""sentence-transformers' default GIST temperature (scale 100: the running-maximum path)."""


def build_recipes(op: str, shape: tuple, dtype: torch.dtype, device: Device, compile_peers: bool, *,
                  wanted: Callable[[str], bool] | None = None):  # fmt: skip
    """The losses trainers combine with in-batch negatives, N queries of dimension D, beside
    sentence-transformers' own: ``mnrl_hardness`` (MultipleNegativesRankingLoss with a hard
    negative per query and ``HARDNESS``) and ``gist`` (GISTEmbedLoss's guided negatives with a
    guide of dimension D / 2, the anchor-anchor and positive-positive blocks; the peer is
    CachedGISTEmbedLoss's loss stage in one mini-batch, GISTEmbedLoss's computation). The peer is
    imported only where ``wanted`` (an implementation-name filter) lets it run."""
    n, d = shape
    inputs = _Inputs(device, dtype)
    if op == "mnrl_hardness":
        shape_dict, peer = {"N": n, "M": 2 * n, "D": d}, "sentence-transformers MNRL"

        def make_inputs():
            return [inputs.randn(n, d).requires_grad_() for _ in range(3)]

        def fused(queries, positives, negatives):
            docs = torch.cat([positives, negatives])
            return functional.in_batch_negatives_loss(queries, docs, n_local=n, **HARDNESS).mean()

    else:
        shape_dict, peer, guide_dim = {"N": n, "M": n, "D": d}, "sentence-transformers GIST", max(1, d // 2)

        def make_inputs():
            return [inputs.randn(n, d).requires_grad_(), inputs.randn(n, d).requires_grad_(),
                    inputs.randn(n, guide_dim), inputs.randn(n, guide_dim)]  # fmt: skip

        def fused(anchors, positives, guide_anchors, guide_positives):
            return functional.guided_in_batch_negatives_loss(
                anchors, positives, guide_anchors, guide_positives, n_positives=n, scale=1 / GIST_TEMPERATURE
            ).mean()

    cases, missing = [Case(op, "simcse_fast", shape_dict, make_inputs, fused)], {}
    if wanted is not None and not wanted(peer):
        return cases, missing
    st_losses, _, reason = _sentence_transformers()
    if st_losses is not None and op == "mnrl_hardness":
        if "hardness_mode" not in inspect.signature(st_losses.MultipleNegativesRankingLoss).parameters:
            st_losses, reason = None, "this sentence-transformers has no hardness_mode (5.3)"
    if st_losses is None:
        missing[peer] = reason
        return cases, missing
    if op == "mnrl_hardness":
        mnrl = st_losses.MultipleNegativesRankingLoss(model=None, **HARDNESS)

        def theirs(queries, positives, negatives):
            return mnrl.compute_loss_from_embeddings([queries, positives, negatives], None)

        need = NM_PEER_BUFFERS * n * 2 * n * 4
    else:
        gist = _st_gist_stage(st_losses, n)

        def theirs(anchors, positives, guide_anchors, guide_positives):
            return gist.calculate_loss([[anchors], [positives]], [[guide_anchors], [guide_positives]])

        # Its cosine similarity broadcasts each pair's product vector: (N, N, D) per block.
        need = 3 * n * n * (d + guide_dim) * 4 + NM_PEER_BUFFERS * 3 * n * n * 4
    cases.append(Case(op, peer, shape_dict, make_inputs, theirs, need))
    return cases, missing


def _st_gist_stage(st_losses, mini_batch_size: int):
    """sentence-transformers' CachedGISTEmbedLoss without its models: its ``calculate_loss`` (the
    loss stage, GISTEmbedLoss's computation on one mini-batch) reads only these attributes."""
    loss = st_losses.CachedGISTEmbedLoss.__new__(st_losses.CachedGISTEmbedLoss)
    torch.nn.Module.__init__(loss)
    settings = {
        "temperature": GIST_TEMPERATURE, "mini_batch_size": mini_batch_size, "show_progress_bar": False,
        "margin_strategy": "absolute", "margin": 0.0, "contrast_anchors": True, "contrast_positives": True,
        "gather_across_devices": False, "similarity_fct": torch.nn.CosineSimilarity(dim=-1),
        "cross_entropy_loss": torch.nn.CrossEntropyLoss(),
    }  # fmt: skip
    for name, value in settings.items():
        setattr(loss, name, value)
    return loss


@dataclasses.dataclass(frozen=True)
class Family:
    """One op family: its ops, how to build their cases at a shape, and its work model:
    ``work(shape, element_size)`` gives per pass the bytes to move (``rate == "gbps"``) or the
    useful FLOPs (``rate == "tflops"``) of a result row's shape."""

    ops: tuple[str, ...]
    build: Callable[..., tuple[list[Case], dict]]
    rate: str
    work: Callable[[dict, int], dict]


def _pooling_work(shape: dict, element_size: int) -> dict:
    """``pooling_bytes`` of a result row's shape."""
    return pooling_bytes(shape["B"], shape["L"], shape["H"], element_size)


def _packed_work(shape: dict, element_size: int) -> dict:
    """``packed_pooling_bytes`` of a result row's shape."""
    return packed_pooling_bytes(shape["T"], shape["B"], shape["H"], element_size)


def _loss_work(shape: dict, element_size: int) -> dict:
    """``loss_flops`` of a result row's shape (the same in every dtype)."""
    return loss_flops(shape["N"], shape["M"], shape["D"])


def _recipes_work(shape: dict, element_size: int) -> dict:
    """``loss_flops`` of the query-document products (the guide's and the same-type blocks are
    not counted)."""
    return loss_flops(shape["N"], shape["M"], shape["D"])


FAMILIES = {
    "pooling": Family(("masked_mean_pool", "masked_max_pool"), build_pooling, "gbps", _pooling_work),
    "loss": Family(("info_nce",), build_loss, "tflops", _loss_work),
    "packed": Family(("packed_mean_pool", "packed_max_pool"), build_packed, "gbps", _packed_work),
    "recipes": Family(("mnrl_hardness", "gist"), build_recipes, "tflops", _recipes_work),
}
OPS = {name: family.ops for name, family in FAMILIES.items()}
DEFAULT_FAMILIES = ("pooling", "loss", "packed")
"""What a run measures unless told: the recipes (``--ops recipes``) take longer, their peers
build the N x N matrices several times over."""
FAMILY_OF = {op: family for family in FAMILIES.values() for op in family.ops}


def dispatch_calls(device: Device, dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], dict]:
    """One ``masked_mean_pool`` forward on tiny tensors (``DISPATCH_SHAPE``) per backend that
    runs here, and the eager reference's for comparison: timing them gives each backend's
    per-call overhead. Also returns why the other backends cannot run."""
    batch, seq_len, hidden = DISPATCH_SHAPE
    inputs = _Inputs(device, dtype)
    tokens = inputs.randn(batch, seq_len, hidden)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device.device)
    backends, missing = _runnable_backends(_padded_probe("masked_mean_pool", inputs), device)
    calls = {
        f"simcse_fast[{backend}]": functools.partial(
            functional.masked_mean_pool, tokens, mask, backend=backend
        )
        for backend in backends
    }
    calls["reference (eager)"] = functools.partial(reference.masked_mean_pool, tokens, mask)
    return calls, missing
