"""The public functions: argument checks, backend choice, then the op of that backend.

``backend``: ``None`` (the process default: ``SIMCSE_FAST_BACKEND``, else ``"auto"``),
``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``. See ``simcse_fast._backends``.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from . import distributed, pooling, similarity
from ._backends import default_backend, resolve_backend
from ._checks import (
    LOSS_DTYPES,
    check_bool,
    check_embedding_pair,
    check_float_dtype,
    check_labels,
    check_loss_scale,
    check_packed_inputs,
    check_pooling_inputs,
    check_reduction,
    check_same_device,
    check_tensor,
    scale_tensor,
)


def _pool(mode: str, packed: bool, token_embeddings: Tensor, layout: Tensor, backend) -> Tensor:
    op = f"{'packed' if packed else 'masked'}_{mode}_pool"
    implementation = resolve_backend(
        backend, token_embeddings.device, op, POOLING_DTYPES, token_embeddings.dtype, "token_embeddings"
    )
    return pooling.pool(mode, packed, token_embeddings, layout, implementation)


POOLING_DTYPES = {name: backend.dtypes for name, backend in pooling.POOLING_BACKENDS.items()}

OP_FAMILIES = {
    "pooling: masked_mean_pool, masked_max_pool, packed_mean_pool, packed_max_pool": POOLING_DTYPES,
    "loss: similarity_logsumexp, info_nce, the sentence-transformers losses": similarity.LOSS_BACKENDS,
}
"""Each op family's backend table, as its module declares it: what ``resolve_backend`` allows."""


def backend_table() -> str:
    """The backend tables of :data:`OP_FAMILIES` as one markdown table (the README's), each
    cell the dtypes a backend takes for that family."""
    names = ("triton", "cuda", "torch")
    lines = ["| ops | " + " | ".join(f"`{name}`" for name in names) + " |", "| --- |" + " --- |" * len(names)]
    for family, supported in OP_FAMILIES.items():
        cells = [
            ", ".join(str(dtype).removeprefix("torch.") for dtype in supported[name])
            if name in supported
            else "-"
            for name in names
        ]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loss_backend(backend, op: str, embeddings: Tensor, argument: str) -> tuple[str, str]:
    """``(requested, resolved)``: the backend asked for (``None`` read as the process default)
    and the one that runs on these tensors (``"triton"`` or ``"torch"``)."""
    requested = default_backend() if backend is None else backend
    resolved = resolve_backend(
        backend, embeddings.device, op, similarity.LOSS_BACKENDS, embeddings.dtype, argument
    )
    return requested, resolved


def _contrastive_loss(
    backends: tuple[str, str], queries: Tensor, docs: Tensor, scale: Tensor, labels, n_local: int,
    flags: tuple, chunk_mb, options=similarity.PLAIN,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The loss op on checked inputs, ``backends`` from :func:`_loss_backend`: memory budget and
    strategy chosen for this call. ``flags``: query_to_query, doc_to_query, doc_to_doc, joint,
    with_positive, exclude_diagonal; ``options``: ``similarity.LossOptions``."""
    requested, resolved = backends
    budget = similarity.memory_budget(chunk_mb, queries.shape[0], docs.shape[0], queries.shape[1])
    implementation = similarity.choose_implementation(
        requested, resolved, queries, docs, scale, labels, n_local, flags, budget, options
    )
    extra = options.op_args(queries.shape[0])
    return similarity.contrastive_loss_op(
        queries, docs, scale, labels, n_local, *flags, implementation, budget, *extra
    )


def _matryoshka_arguments(dims, weights, dim: int) -> tuple[list[int], list[float]] | None:
    """``(dims ascending, their weights)`` from the ``matryoshka_dims`` and
    ``matryoshka_weights`` arguments (``None``: no Matryoshka loss), for embeddings of size
    ``dim``. Raises ``TypeError``/``ValueError`` naming the argument: the dimensions must be
    distinct ints in ``[1, dim]``, the weights (default 1 each) finite real numbers, one per
    dimension."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims: the dimensions they weight")
        return None
    if isinstance(dims, (str, bytes, Tensor)) or not hasattr(dims, "__iter__"):
        raise TypeError(f"matryoshka_dims must be a sequence of ints, got {type(dims).__name__}")
    dims = list(dims)
    if not dims:
        raise ValueError("matryoshka_dims must name at least one dimension; got an empty sequence")
    for value in dims:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"matryoshka_dims must hold ints; got {value!r} ({type(value).__name__})")
        if not 1 <= value <= dim:
            raise ValueError(f"matryoshka_dims must lie in [1, {dim}] (the embedding size D); got {value}")
    if len(set(dims)) != len(dims):
        raise ValueError(
            f"matryoshka_dims must be distinct (give a repeated dimension one weight, the sum); got {dims}"
        )
    if weights is None:
        weights = [1.0] * len(dims)
    else:
        if isinstance(weights, (str, bytes, Tensor)) or not hasattr(weights, "__iter__"):
            raise TypeError(f"matryoshka_weights must be a sequence of numbers, got {type(weights).__name__}")
        weights = list(weights)
        for value in weights:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"matryoshka_weights must hold real numbers; got {value!r} ({type(value).__name__})"
                )
            if not math.isfinite(value):
                raise ValueError(f"matryoshka_weights must be finite; got {value}")
        if len(weights) != len(dims):
            raise ValueError(
                f"matryoshka_weights must have one weight per dimension of matryoshka_dims "
                f"({len(dims)}); got {len(weights)}"
            )
    pairs = sorted(zip((int(d) for d in dims), (float(w) for w in weights), strict=True))
    return [d for d, _ in pairs], [w for _, w in pairs]


def _matryoshka_loss(
    backends: tuple[str, str], queries: Tensor, docs: Tensor, scale: Tensor, labels, n_local: int,
    flags: tuple, chunk_mb, matryoshka: tuple[list[int], list[float]], options=similarity.PLAIN,
) -> Tensor:  # fmt: skip
    """The Matryoshka loss op (per-row weighted sum) on checked inputs: its memory budget
    (``similarity.matryoshka_budget``), the strategy the single-dimension loss chooses for this
    call (with the same ``options``: hardness weighting, GIST's guide), a fused tile mapped to
    ``"gemm"`` (``similarity.matryoshka_implementation``). Every dimension, adjusted logits
    included, in one pass."""
    requested, resolved = backends
    dims, weights = matryoshka
    budget = similarity.matryoshka_budget(
        chunk_mb, queries.shape[0], docs.shape[0], queries.shape[1], len(dims)
    )
    chosen = similarity.choose_implementation(
        requested, resolved, queries, docs, scale, labels, n_local, flags, budget, options
    )
    loss, _ = similarity.matryoshka_loss_op(
        queries, docs, scale, labels, dims, weights, n_local, *flags,
        similarity.matryoshka_implementation(chosen), budget, *options.op_args(queries.shape[0]),
    )  # fmt: skip
    return loss


def masked_mean_pool(
    token_embeddings: Tensor, attention_mask: Tensor, *, backend: str | None = None
) -> Tensor:
    """Mean of the present tokens: ``(B, L, H), (B, L) -> (B, H)``.

    ``out[b, h] = sum_l present[b, l] x[b, l, h] / max(1, sum_l present[b, l])`` with
    ``present = attention_mask != 0`` (bool, integer or floating mask). Output in the input's
    dtype, accumulated in fp32 (fp64 for fp64 input). Rows with no present token give zeros and
    zero gradient; values at absent positions never reach the output.
    """
    check_pooling_inputs(token_embeddings, attention_mask)
    return _pool("mean", False, token_embeddings, attention_mask, backend)


def masked_max_pool(
    token_embeddings: Tensor, attention_mask: Tensor, *, backend: str | None = None
) -> Tensor:
    """Elementwise maximum over the present tokens: ``(B, L, H), (B, L) -> (B, H)``.

    ``out[b, h] = max_{l : attention_mask[b, l] != 0} x[b, l, h]``, in the input's dtype. Rows
    with no present token give zeros and zero gradient. NaN ranks above every number. The
    gradient goes to one position per ``(b, h)``: the first (lowest ``l``) present position
    holding the maximum.
    """
    check_pooling_inputs(token_embeddings, attention_mask)
    return _pool("max", False, token_embeddings, attention_mask, backend)


def packed_mean_pool(token_embeddings: Tensor, cu_seqlens: Tensor, *, backend: str | None = None) -> Tensor:
    """Mean of each sequence of a packed (varlen, unpadded) batch: ``(T, H), (B + 1,) -> (B, H)``.

    ``token_embeddings (T, H)`` holds ``B`` sequences back to back, sequence ``b`` being rows
    ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` (int32 or int64 offsets: 0 first, non-decreasing,
    ``T`` last), as flash-attention's varlen functions and sentence-transformers' flattened
    path give them. ``out[b] = sum of its rows / max(1, its length)``: an empty sequence gives
    zeros and zero gradient. Output in the input's dtype, accumulated in fp32 (fp64 for fp64).
    Checking the offsets reads them once (a device synchronization for CUDA tensors); inside
    ``torch.compile`` only their shape and dtype are checked.
    """
    check_packed_inputs(token_embeddings, cu_seqlens)
    return _pool("mean", True, token_embeddings, cu_seqlens, backend)


def packed_max_pool(token_embeddings: Tensor, cu_seqlens: Tensor, *, backend: str | None = None) -> Tensor:
    """Elementwise maximum of each sequence of a packed batch: ``(T, H), (B + 1,) -> (B, H)``
    (layout and offset checks as :func:`packed_mean_pool`). An empty sequence gives zeros and
    zero gradient; NaN ranks above every number; the gradient goes to the first position of
    the sequence holding the maximum."""
    check_packed_inputs(token_embeddings, cu_seqlens)
    return _pool("max", True, token_embeddings, cu_seqlens, backend)


def similarity_logsumexp(
    queries: Tensor,
    keys: Tensor,
    *,
    scale=20.0,
    exclude_diagonal: bool = False,
    backend: str | None = None,
    chunk_mb: float | None = None,
    gather_across_devices: bool = False,
    group=None,
) -> Tensor:
    """Row-wise log-sum-exp of scaled cosine similarities, without the N x M matrix.

    ``out[i] = log sum_j exp(scale * <q_i / max(|q_i|, eps), k_j / max(|k_j|, eps)>)``, eps =
    1e-12; ``queries (N, D)``, ``keys (M, D)`` (fp32, fp16 or bf16, same dtype and device) ->
    ``(N,)`` fp32. ``exclude_diagonal=True`` leaves out the term ``j = i`` (needs M >= N).
    ``scale``: a float or a 0-dim tensor, which receives a gradient. Extra memory beyond the
    inputs and their gradients is O((N + M) D) plus the N x M chunk budget: ``chunk_mb`` MiB,
    else ``SIMCSE_FAST_LOSS_CHUNK_MB``, else the size of the fp32 gradient buffers (at least
    32 MiB); a larger budget buys fewer, larger backward chunks.

    ``gather_across_devices=True`` with an initialized ``torch.distributed`` process group
    (``group``, default the world): the keys of every rank are all-gathered with gradient and the
    local queries score against all of them (``exclude_diagonal`` leaves out this rank's key
    ``i``). Every rank must pass the same shapes. Without a process group it changes nothing.
    """
    check_embedding_pair("queries", queries, "keys", keys)
    check_bool("exclude_diagonal", exclude_diagonal)
    if exclude_diagonal and keys.shape[0] < queries.shape[0]:
        raise ValueError(
            f"exclude_diagonal=True needs at least as many keys as queries (M >= N); "
            f"got N = {queries.shape[0]}, M = {keys.shape[0]}"
        )
    check_bool("gather_across_devices", gather_across_devices)
    scale = scale_tensor(scale, queries.device)
    backends = _loss_backend(backend, "similarity_logsumexp", queries, "queries")
    if gather_across_devices and distributed.is_distributed(group):
        gathered = distributed.all_gather_with_grad(keys, group)
        keys = distributed.local_first(gathered, keys.shape[0], group)
    flags = (False, False, False, False, False, exclude_diagonal)
    lse, _, _ = _contrastive_loss(backends, queries, keys, scale, None, queries.shape[0], flags, chunk_mb)
    return lse


def info_nce(
    anchors: Tensor,
    candidates: Tensor,
    *,
    labels: Tensor | None = None,
    scale=20.0,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str | None = None,
    chunk_mb: float | None = None,
    gather_across_devices: bool = False,
    group=None,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> Tensor:
    """Cross-entropy over scaled cosine similarities (InfoNCE, MultipleNegativesRankingLoss).

    ``logits = scale * cos(anchors (N, D), candidates (M, D))``, M >= N, never materialized.
    ``labels`` (N,) defaults to ``arange(N)``: candidate ``i`` is anchor ``i``'s positive and
    rows ``N..M-1`` are extra (hard) negatives. Per anchor
    ``l_i = logsumexp_j(logits[i, j]) - logits[i, labels[i]]``. ``symmetric=True`` (default
    labels only) also scores each positive ``j < N`` against all anchors:
    ``l_i = (logsumexp_j logits[i, j] + logsumexp_k logits[k, i]) / 2 - logits[i, i]``.
    ``reduction``: ``"mean"``, ``"sum"`` (0-dim) or ``"none"`` ((N,)). The loss is fp32;
    gradients reach anchors, candidates and a tensor ``scale`` in their own dtypes. An empty batch
    (N = 0) and a float ``scale`` that is not positive raise ``ValueError``; a tensor ``scale`` is
    not checked (reading it would synchronize with the GPU), so a learnable one moves freely.
    float64 inputs are refused: use ``simcse_fast.reference`` for a float64 computation.
    ``chunk_mb``: the N x M memory budget, as in :func:`similarity_logsumexp`.

    ``gather_across_devices=True`` with an initialized ``torch.distributed`` process group
    (``group``, default the world): the candidates of every rank (and, when symmetric, the
    anchors) are all-gathered with gradient, local anchors score against all candidates, and
    ``labels`` keep indexing this rank's candidates. Each rank's loss covers its own anchors;
    averaged over ranks as DistributedDataParallel averages gradients, it is the loss of the
    whole batch. Every rank must pass the same shapes. Without a process group it changes
    nothing. Memory of the gather: O(world x rows x D).

    ``matryoshka_dims`` (distinct ints in ``[1, D]``, e.g. ``(768, 512, 256, 128, 64)``) makes
    the per-anchor loss ``sum_k w_k l_i^(d_k)``, where ``l^(d)`` is the loss above on the first
    ``d`` columns of anchors and candidates, each prefix normalized on its own (the cosine of
    prefixes; sentence-transformers' ``MatryoshkaLoss``), and ``w_k`` the
    ``matryoshka_weights`` (real numbers, default 1 each); ``reduction`` then applies to that
    sum. All dimensions are computed in one pass: the products of one loss at the largest
    dimension plus O(N M) elementwise work per dimension.

    The gradient of the logits, ``g_i (P_ij - [j = labels_i])``, is formed in fp32 with
    ``1 - P_ii`` free of cancellation and only then rounded to the inputs' dtype, so half-precision
    gradients stay accurate for easy positives (``P_ii`` near 1, as in unsupervised SimCSE).
    """
    check_embedding_pair("anchors", anchors, "candidates", candidates)
    n_anchors, n_candidates = anchors.shape[0], candidates.shape[0]
    if n_anchors == 0:
        raise ValueError("anchors must have at least one row: the loss of an empty batch is undefined")
    check_loss_scale(scale)
    if n_candidates < n_anchors:
        raise ValueError(
            "candidates must have at least one row per anchor (M >= N); "
            f"got N = {n_anchors}, M = {n_candidates}"
        )
    check_bool("symmetric", symmetric)
    check_reduction(reduction)
    if labels is not None:
        if symmetric:
            raise ValueError("symmetric=True scores candidate i as anchor i's positive; it takes no labels")
        check_labels(labels, n_anchors, n_candidates, anchors.device)
    matryoshka = _matryoshka_arguments(matryoshka_dims, matryoshka_weights, anchors.shape[1])
    scale = scale_tensor(scale, anchors.device)
    backends = _loss_backend(backend, "info_nce", anchors, "anchors")
    check_bool("gather_across_devices", gather_across_devices)
    labels = None if labels is None else labels.long().contiguous()
    queries, docs = anchors, candidates
    if gather_across_devices and distributed.is_distributed(group):
        # Local rows first: this rank's labels and positives keep their indices.
        gathered = distributed.all_gather_with_grad(candidates, group)
        docs = distributed.local_first(gathered, n_candidates, group)
        if symmetric:
            gathered = distributed.all_gather_with_grad(anchors, group)
            queries = distributed.local_first(gathered, n_anchors, group)
    flags = (False, symmetric, False, False, True, False)
    if matryoshka is None:
        loss, _, _ = _contrastive_loss(backends, queries, docs, scale, labels, n_anchors, flags, chunk_mb)
    else:
        loss = _matryoshka_loss(
            backends, queries, docs, scale, labels, n_anchors, flags, chunk_mb, matryoshka
        )
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def in_batch_negatives_loss(
    queries: Tensor,
    docs: Tensor,
    *,
    n_local: int,
    scale=20.0,
    directions=("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    backend: str | None = None,
    chunk_mb: float | None = None,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> Tensor:
    """Per-query loss ``(n_local,)`` fp32 of sentence-transformers' MultipleNegativesRankingLoss
    family, without the similarity matrix.

    ``queries (Nq, D)``: this process's ``n_local`` queries first, then any gathered from other
    processes; ``docs (k Nq, D)``: ``k`` columns of documents (positives, then hard negatives),
    each laid out like the queries. For ``i < n_local``: ``loss_i = log_z_i - scale cos(q_i,
    d_i)``, with ``log_z_i`` over the ``directions`` ("query_to_doc" required; "query_to_query",
    "doc_to_query", "doc_to_doc" as in sentence-transformers): ``partition_mode="joint"`` one
    softmax over all their terms, ``"per_direction"`` the mean of their log-sum-exps.

    ``hardness_mode`` (sentence-transformers >= 5.3's, Lan et al. 2025) with
    ``hardness_strength = alpha > 0``: in query_to_doc the selected negatives' logits become
    ``scale cos + alpha stopgrad(cos)``: ``"in_batch_negatives"`` the documents of other queries,
    ``"hard_negatives"`` the query's own hard negatives, ``"all_negatives"`` every document but the
    positive. A selected term's forward multiplier is ``scale + alpha``, its gradient's ``scale``.

    ``matryoshka_dims`` / ``matryoshka_weights``: the weighted sum of this loss over prefix
    dimensions, in one pass, as in :func:`simcse_fast.info_nce`.
    """
    check_embedding_pair("queries", queries, "docs", docs)
    n_queries = queries.shape[0]
    if isinstance(n_local, bool) or not isinstance(n_local, int) or not 0 <= n_local <= n_queries:
        raise ValueError(f"n_local must be an int in [0, {n_queries}] (the local queries); got {n_local!r}")
    if docs.shape[0] == 0 or (n_queries and docs.shape[0] % n_queries):
        raise ValueError(
            f"docs must hold one or more whole columns of {n_queries} documents (one per query); "
            f"got {docs.shape[0]} rows"
        )
    unknown = set(directions) - set(similarity.DIRECTIONS)
    if unknown or "query_to_doc" not in directions:
        raise ValueError(
            f"directions must include 'query_to_doc' and come from {similarity.DIRECTIONS}; "
            f"got {directions!r}"
        )
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction'; got {partition_mode!r}")
    if hardness_mode is not None and hardness_mode not in similarity.HARDNESS_MODES:
        raise ValueError(
            f"hardness_mode must be None or one of {', '.join(map(repr, similarity.HARDNESS_MODES))}; "
            f"got {hardness_mode!r}"
        )
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, (int, float)):
        raise TypeError(f"hardness_strength must be a number, got {type(hardness_strength).__name__}")
    if not 0 <= hardness_strength < float("inf"):
        raise ValueError(f"hardness_strength must be a non-negative, finite number; got {hardness_strength}")
    hardness = similarity.HARDNESS_MODES[hardness_mode] if hardness_mode and hardness_strength > 0 else 0
    matryoshka = _matryoshka_arguments(matryoshka_dims, matryoshka_weights, queries.shape[1])
    scale = scale_tensor(scale, queries.device)
    backends = _loss_backend(backend, "in_batch_negatives_loss", queries, "queries")
    flags = (
        "query_to_query" in directions, "doc_to_query" in directions, "doc_to_doc" in directions,
        partition_mode == "joint", True, False,
    )  # fmt: skip
    options = similarity.LossOptions(hardness=hardness, hardness_strength=hardness_strength)
    if matryoshka is not None:
        return _matryoshka_loss(
            backends, queries, docs, scale, None, n_local, flags, chunk_mb, matryoshka, options
        )
    loss, _, _ = _contrastive_loss(backends, queries, docs, scale, None, n_local, flags, chunk_mb, options)
    return loss


def guided_in_batch_negatives_loss(
    anchors: Tensor,
    docs: Tensor,
    guide_anchors: Tensor,
    guide_docs: Tensor,
    *,
    n_positives: int,
    scale=100.0,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    backend: str | None = None,
    chunk_mb: float | None = None,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> Tensor:
    """Per-anchor loss ``(B,)`` fp32 of sentence-transformers' GISTEmbedLoss (guided in-batch
    negatives, Solatorio 2024), without the similarity matrices of the model or the guide.

    ``anchors (B, D)``: this process's anchors; ``docs (k P, D)``: ``k`` columns of ``P =
    n_positives`` documents, the positives first (anchor ``i``'s at row ``i``; rows ``B..P-1``
    gathered from other processes), then any hard negatives laid out the same way;
    ``guide_anchors (B, Dg)`` and ``guide_docs (k P, Dg)``: the guide model's embeddings of the
    same texts (no gradient). One softmax per anchor over ``scale`` times its cosines with every
    document, with every anchor when ``contrast_anchors`` (anchor-anchor), and from its positive
    to every positive when ``contrast_positives`` (positive-positive). A term leaves the softmax
    when the guide's cosine of its pair is above the guide's cosine of the anchor's positive pair
    less ``margin`` (``margin_strategy="relative"``: less ``margin`` times its magnitude), the
    positive itself excepted. ``loss_i = log_z_i - scale cos(a_i, d_i)``; ``scale`` is
    sentence-transformers' ``1 / temperature``. Guide cosines within ``2**-17`` of the threshold
    count as equal to it (kept), so that pairs of identical texts, which tie exactly in
    sentence-transformers (SimCSE's anchor and positive, a document that is one anchor's positive
    and another's negative), are kept as there although the sums run in another order.

    ``matryoshka_dims`` (distinct ints in ``[1, D]``) / ``matryoshka_weights`` (default 1 each):
    ``loss_i = sum_k w_k loss_i^(d_k)``, the loss above on the first ``d_k`` columns of
    ``anchors`` and ``docs`` (each prefix normalized on its own), the guide's embeddings and
    therefore its mask the same at every dimension (sentence-transformers' ``MatryoshkaLoss``
    truncates the model's embeddings only); all dimensions in one pass, as in
    :func:`simcse_fast.info_nce`.
    """
    check_embedding_pair("anchors", anchors, "docs", docs)
    for name, guide, rows in (("guide_anchors", guide_anchors, anchors), ("guide_docs", guide_docs, docs)):
        check_tensor(name, guide, 2)
        check_float_dtype(name, guide, LOSS_DTYPES)
        check_same_device(name, guide, "anchors", anchors)
        if guide.shape[0] != rows.shape[0]:
            raise ValueError(
                f"{name} must have one row per embedding ({rows.shape[0]}); got {guide.shape[0]}"
            )
    if guide_docs.dtype != guide_anchors.dtype or guide_docs.shape[1] != guide_anchors.shape[1]:
        raise TypeError(
            f"guide_docs must have the dtype and size of guide_anchors ({guide_anchors.dtype}, "
            f"{guide_anchors.shape[1]}); got {guide_docs.dtype}, {guide_docs.shape[1]}"
        )
    n_anchors = anchors.shape[0]
    if n_anchors == 0:
        raise ValueError("anchors must have at least one row: the loss of an empty batch is undefined")
    if isinstance(n_positives, bool) or not isinstance(n_positives, int) or n_positives < n_anchors:
        raise ValueError(f"n_positives must be an int >= the {n_anchors} anchors; got {n_positives!r}")
    if docs.shape[0] % n_positives:
        raise ValueError(
            f"docs must hold whole columns of n_positives = {n_positives} rows; got {docs.shape[0]}"
        )
    if margin_strategy not in ("absolute", "relative"):
        raise ValueError(f"margin_strategy must be 'absolute' or 'relative'; got {margin_strategy!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"margin must be a number, got {margin!r}")
    if margin != margin:
        raise ValueError("margin must be a number, got nan")
    check_bool("contrast_anchors", contrast_anchors)
    check_bool("contrast_positives", contrast_positives)
    matryoshka = _matryoshka_arguments(matryoshka_dims, matryoshka_weights, anchors.shape[1])
    scale = scale_tensor(scale, anchors.device)
    backends = _loss_backend(backend, "guided_in_batch_negatives_loss", anchors, "anchors")
    flags = (contrast_anchors, False, contrast_positives, True, True, False)
    options = similarity.LossOptions(
        doc_block=n_positives, guide_queries=guide_anchors.detach(), guide_docs=guide_docs.detach(),
        margin=margin, relative_margin=margin_strategy == "relative",
    )  # fmt: skip
    if matryoshka is not None:
        return _matryoshka_loss(
            backends, anchors, docs, scale, None, n_anchors, flags, chunk_mb, matryoshka, options
        )
    loss, _, _ = _contrastive_loss(backends, anchors, docs, scale, None, n_anchors, flags, chunk_mb, options)
    return loss
