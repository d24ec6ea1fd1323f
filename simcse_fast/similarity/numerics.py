"""What every strategy shares: the inputs as the kernels see them, the directions and their
geometry, the forward's statistics, and how the gradient weights ``W`` are formed and scaled
(the package docstring has the formulas). No function here launches a Triton kernel."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-12
"""Norms are clamped at this value, as in ``torch.nn.functional.normalize``."""

DEFAULT_BUDGET_FLOOR = 32 << 20
"""Bytes of N x M intermediates (a chunk of ``W`` and its temporaries) the default budget
always allows, however small the inputs."""

CHUNK_ENV_VAR = "SIMCSE_FAST_LOSS_CHUNK_MB"

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

ALIGNMENT = 16
"""D and the row stride are made multiples of 16 elements and the base address 16-byte aligned
(zero padding or a copy, see ``Side``): Triton then knows every row starts aligned and
vectorizes the loads feeding the tensor cores; with a ragged D the kernels need more registers
than sm_90 has and spill."""


def inverse_norms(x: Tensor) -> Tensor:
    """``1 / max(|x_i|, eps)`` per row, fp32, shape (rows,)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal()


def accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with the addition inside the GEMM (``beta = 1``: no temporary of
    ``acc``'s size, no separate add pass). ``acc`` is fp32; half operands on a GPU run the
    tensor-core GEMM with fp32 accumulation and result (``addmm(..., out_dtype=float32)``,
    PyTorch >= 2.8); a CPU multiplies fp32 copies (same values)."""
    if b.dtype == torch.float32 and a.dtype != torch.float32:
        a = a.float()  # a CPU's half W against an fp32 copy of the unit rows
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


class Side:
    """One input matrix: an aligned (padded) copy if needed, inverse norms, its unit rows (in the
    input dtype for the backward GEMMs, in fp32 for the torch path's cosines and the epilogue)
    and the fp32 accumulator ``U`` of its gradient."""

    def __init__(self, x: Tensor):
        self.dim = x.shape[1]
        padding = -self.dim % ALIGNMENT
        aligned = x.stride(1) == 1 and x.stride(0) % ALIGNMENT == 0 and x.data_ptr() % 16 == 0
        if padding or not aligned:
            # One O(rows x D) copy; zero columns change neither dot products nor norms.
            padded = x.new_zeros((x.shape[0], self.dim + padding))
            padded[:, : self.dim] = x
            x = padded
        self.x = x
        self.rows = x.shape[0]
        self.inv_norm = inverse_norms(x)
        # CPU GEMMs take fp32 copies of half operands (same values, fp32 accumulation); a GPU
        # multiplies the half operands themselves.
        self._upcast = x.dtype != torch.float32 and not x.is_cuda

    def operand(self, tensor: Tensor) -> Tensor:
        """``tensor`` as a GEMM operand: itself on a GPU, an fp32 copy of a half tensor on a CPU."""
        return tensor.float() if self._upcast else tensor

    @functools.cached_property
    def unit(self) -> Tensor:
        """``x_i a_i`` rounded once to the input dtype: the operand of the backward GEMMs (on a
        CPU, half inputs give an fp32 copy of those rounded values)."""
        return self.operand((self.x.float() * self.inv_norm[:, None]).to(self.x.dtype))

    @functools.cached_property
    def grad_acc(self) -> Tensor:
        return torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)

    @functools.cached_property
    def unit32(self) -> Tensor:
        """``x_i a_i`` in fp32 (torch path on a CPU or for fp32 inputs, and the epilogue)."""
        return self.x.float() * self.inv_norm[:, None]

    def dots(self, rows: slice, other: Side, n_cols: int, out: Tensor | None = None) -> Tensor:
        """``<x[rows], other.x[:n_cols]>`` by the vendor GEMM with an fp32 result: for half inputs
        the exact products accumulated in fp32, as the fused tiles form them."""
        a, b = self.operand(self.x[rows]), other.operand(other.x[:n_cols])
        if a.dtype == torch.float32:
            return torch.mm(a, b.T, out=out)
        return torch.mm(a, b.T, out_dtype=torch.float32, out=out)

    def gradient(self, factor: Tensor) -> Tensor:
        """The gradient through ``x / max(|x|, eps)`` from the accumulated ``U`` times ``factor``
        (the scale over ``W``'s scaling), cast once to ``x.dtype``. Works in place on ``U``: the
        epilogue adds no (rows, D) buffer but the fp32 unit rows."""
        self.__dict__.pop("unit", None)  # the GEMM operand is no longer needed
        unit, acc = self.unit32, self.grad_acc
        radial = torch.linalg.vecdot(unit, acc)
        # A norm below eps is clamped: the unit vector is then x / eps, with no radial term.
        projected = torch.where(self.inv_norm < 1.0 / NORM_EPS, radial, torch.zeros_like(radial))
        acc.addcmul_(unit, projected[:, None], value=-1.0).mul_(factor * self.inv_norm[:, None])
        # Contiguous whatever the padding or the input's layout: the fake kernel promises it.
        return acc[:, : self.dim].to(self.x.dtype).contiguous()


def exclusion_mask(global_rows: Tensor, n_cols: int, period: int) -> Tensor:
    cols = torch.arange(n_cols, device=global_rows.device)
    return (cols % period)[None, :] == global_rows[:, None]


def budget_rows(budget: int, bytes_per_row: int, n_rows: int) -> int:
    return max(1, min(n_rows, budget // max(bytes_per_row, 1)))


def merge_partials(partial_shift: Tensor, partial_sum: Tensor) -> Tensor:
    """``m + log sum_k sum_k exp(shift_k - m)``, ``m = max_k shift_k``, over the splits ``k``
    (dim 0), in a fixed order."""
    top = partial_shift.amax(dim=0)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (partial_sum * torch.exp(partial_shift - top)).sum(dim=0)
    return top + torch.log(total)


def positive_columns(mode: int, labels: Tensor | None, start: int, stop: int, first_row: int, device):
    """Column of the positive of rows ``start:stop``, shape (rows, 1): the row's global index
    ``first_row + r`` (mode 1) or its label (mode 2)."""
    if mode == 2:
        return labels[start:stop, None]
    return torch.arange(first_row + start, first_row + stop, device=device)[:, None]


@dataclass(frozen=True)
class Direction:
    """One direction's row softmax: which side its rows and columns come from, whether columns are
    left out structurally (``exclude``), whether it holds the positive, whether the loss's
    hardness weighting applies to it and its ``GUIDED`` kind (``_adjusted_row_logits``)."""

    name: str
    rows_are_queries: bool
    cols_are_queries: bool
    exclude: bool
    has_positive: bool
    hardness: bool = False
    guided: int = 0


def directions(
    query_to_query, doc_to_query, doc_to_doc, exclude_diagonal, with_positive, hardness=False, guided=False
) -> list[Direction]:
    """query_to_doc first; the positive pair (q_i, d_i) is a term of query_to_doc and of
    doc_to_query. Hardness weighting applies to query_to_doc (sentence-transformers' rule). A
    guided loss (GIST) masks query_to_doc keeping the positive, and its query_to_query
    (anchor-anchor) and doc_to_doc (positive-positive) blocks are masked by the guide only, with
    no structural exclusion."""
    chosen = [
        Direction("query_to_doc", True, False, exclude_diagonal, with_positive, hardness, 1 if guided else 0)
    ]
    if query_to_query:
        chosen.append(Direction("query_to_query", True, True, not guided, False, guided=2 if guided else 0))
    if doc_to_query:
        chosen.append(Direction("doc_to_query", False, True, False, with_positive))
    if doc_to_doc:
        chosen.append(Direction("doc_to_doc", False, False, not guided, False, guided=2 if guided else 0))
    return chosen


def direction_positive(direction: Direction, labels: Tensor | None) -> tuple[int, Tensor | None]:
    """``(mode, labels)`` of a direction's positive column as the row passes take it: mode 0 (no
    positive), 1 (the column of the row's own index) or 2 (column ``labels[i]``: query_to_doc
    with labels)."""
    if not direction.has_positive:
        return 0, None
    return (1, None) if labels is None or direction.name != "query_to_doc" else (2, labels)


def direction_geometry(direction: Direction, n_queries: int, n_docs: int, doc_block: int) -> tuple[int, int]:
    """``(n_cols, exclude_period)``: query_to_query excludes ``k == i``, doc_to_doc every column
    ``j`` with ``j mod Nq == i`` (the positive's own position in each document column), and
    query_to_doc with ``exclude_diagonal`` ``j == i`` (period Nd >= Nq). A guided doc_to_doc
    (GIST's positive-positive block) spans the first ``doc_block`` documents, the positives."""
    if direction.name == "doc_to_doc" and direction.guided:
        n_cols = doc_block
    else:
        n_cols = n_queries if direction.cols_are_queries else n_docs
    if not direction.exclude:
        return n_cols, 0
    return n_cols, (n_docs if direction.name == "query_to_doc" else n_queries)


HARDNESS_MODES = {"in_batch_negatives": 1, "hard_negatives": 2, "all_negatives": 3}
"""sentence-transformers' ``hardness_mode`` -> the kernels' ``HARDNESS``."""


@dataclass(frozen=True)
class Adjustment:
    """How a row softmax adjusts its logits (``_adjusted_row_logits``): the hardness weighting
    (mode, strength, the period of a query's own documents) and the guided mask (its kind, the
    guide's rows and columns, the rows' thresholds)."""

    hardness: int = 0
    hardness_strength: float = 0.0
    own_period: int = 1
    guided: int = 0
    guide_rows: Side | None = None
    guide_cols: Side | None = None
    threshold: Tensor | None = None


NO_ADJUSTMENT = Adjustment()


def pair_cosines(x: Side, y: Side, n: int, labels: Tensor | None = None) -> Tensor:
    """``cos(x_i, y_{label_i})`` for ``i < n`` in fp32 from the raw rows (labels default to
    ``i``). One formula for every pair: identical vectors give identical values."""
    if labels is None:
        others, inv_others = y.x[:n], y.inv_norm[:n]
    else:
        others, inv_others = y.x.index_select(0, labels), y.inv_norm.index_select(0, labels)
    dots = (x.x[:n].float() * others.float()).sum(dim=1)
    return dots * x.inv_norm[:n] * inv_others


GUIDE_TIE = 2.0**-17
"""Guide cosines within this of a row's threshold count as equal to it (not above: kept). Each
pair's guide cosine is accumulated in another order than sentence-transformers' and than the
threshold's, so identical texts, whose cosines tie exactly in sentence-transformers (an anchor and
its positive in SimCSE pairs, a document that is one anchor's positive and another's negative),
differ here by a few fp32 ulps; a genuine cosine that close to the threshold is decided by
rounding in sentence-transformers too."""


@dataclass(frozen=True)
class Guide:
    """GIST's guide: its query and document embeddings and each row's threshold: the guide's
    cosine of the row's positive pair less the margin (absolute, or times its magnitude), plus
    ``GUIDE_TIE``."""

    queries: Side
    docs: Side
    threshold: Tensor

    @classmethod
    def build(
        cls, guide_queries: Tensor, guide_docs: Tensor, n_local: int, margin: float, relative: bool
    ) -> Guide:
        queries, docs = Side(guide_queries), Side(guide_docs)
        positive = pair_cosines(queries, docs, n_local)
        threshold = positive - positive.abs() * margin if relative else positive - margin
        return cls(queries, docs, threshold + GUIDE_TIE)


def adjustment(direction: Direction, hardness: int, strength: float, doc_block: int, guide: Guide | None):
    """The adjustment of ``direction``'s row softmax."""
    if direction.guided:
        side = guide.queries if direction.rows_are_queries else guide.docs
        cols = guide.docs if direction.name == "query_to_doc" else side
        return Adjustment(
            guided=direction.guided, guide_rows=side, guide_cols=cols, threshold=guide.threshold
        )
    if direction.hardness and hardness:
        return Adjustment(hardness=hardness, hardness_strength=strength, own_period=doc_block)
    return NO_ADJUSTMENT


def split_stats(stats: Tensor, chosen) -> tuple[Tensor, Tensor]:
    """``(lse (#directions, n), lse without the positive (#directions with one, n))``."""
    return stats[: len(chosen)], stats[len(chosen) :]


def negatives_lse(lse: Tensor, negative_lse: Tensor, chosen) -> Tensor:
    """Per direction, the log-sum-exp without the positive's term where it has one."""
    rows, k = [], 0
    for index, direction in enumerate(chosen):
        if direction.has_positive:
            rows.append(negative_lse[k])
            k += 1
        else:
            rows.append(lse[index])
    return torch.stack(rows)


def positive_slots(chosen) -> int:
    return sum(direction.has_positive for direction in chosen)


def row_loss(lse: Tensor, negative_lse: Tensor, chosen, positive_logits: Tensor | None, joint) -> Tensor:
    """Per-row loss ``(n,)`` from the forward's statistics: ``log_z_i - logit_positive`` (no
    positive: ``log_z_i``), joint (``log_z`` the log-sum-exp over the directions) or per
    direction (their mean). With a positive, ``log(1 + exp(y))`` of the log-sum-exp of the other
    terms keeps the relative accuracy of a small loss, where ``log_z - logit`` would lose it to
    the cancellation of two numbers near ``|s|``."""
    if positive_logits is None:
        return torch.logsumexp(lse, dim=0) if joint else lse.mean(dim=0)
    negatives = negatives_lse(lse, negative_lse, chosen)
    if joint:
        # logaddexp(excess, log slots), with the constant as a Python number: no host-to-device copy.
        log_slots = math.log(positive_slots(chosen))
        return log_slots + F.softplus(torch.logsumexp(negatives, dim=0) - positive_logits - log_slots)
    per_direction = [
        F.softplus(negatives[k] - positive_logits) if direction.has_positive else lse[k] - positive_logits
        for k, direction in enumerate(chosen)
    ]
    return torch.stack(per_direction).mean(dim=0)


def complement(lse, negative_lse, chosen, joint) -> Tensor:
    """Per row, the probability outside the positive's terms, from the forward's sums without
    them (no ``1 - P`` cancellation). Joint: ``1 - slots P`` of the one softmax; per direction:
    ``sum_k (1 - P_k)`` over the directions that hold the positive (0 without a positive)."""
    negatives = negatives_lse(lse, negative_lse, chosen)
    if joint:
        return torch.exp(torch.logsumexp(negatives, dim=0) - torch.logsumexp(lse, dim=0))
    # A loop over the directions, not an index list: indexing by a Python list copies it to the
    # device (a host synchronization).
    total = torch.zeros_like(lse[0])
    for k, direction in enumerate(chosen):
        if direction.has_positive:
            total = total + torch.exp(negatives[k] - lse[k])
    return total


def positive_values(complement_, chosen, scaled_grad, joint) -> Tensor:
    """``W`` at each row's positive, in fp32 without cancellation. Joint: the positive logit
    holds ``slots`` terms of one softmax, ``W = g (slots P - 1) = -g complement``. Per direction:
    ``W = -(g / n) sum_k (1 - P_k) - g (1 - slots / n)``."""
    if joint:
        return -scaled_grad * complement_
    n = len(chosen)
    return -(scaled_grad / n) * complement_ - scaled_grad * (1 - positive_slots(chosen) / n)


def weight_bound(complement_, chosen, grad, joint) -> Tensor:
    """A bound (0-dim fp32 tensor) on the largest entry of ``W``, from the forward's O(N)
    statistics. Per row: ``|W_ij| <= sum over its softmaxes of |w| (1 - P_positive)`` (``1`` for
    a softmax without a positive) plus ``|W_positive|``; an entry carries a row softmax and at
    most one column softmax, so ``|W| <= 2 max_i bound_i``."""
    if grad.numel() == 0:
        return grad.new_zeros(())
    magnitude = grad.abs()
    n = len(chosen)
    if joint:
        bound = magnitude * n * complement_
    else:
        bound = magnitude / n * (complement_ + (n - positive_slots(chosen)))
    return (bound + magnitude * 2).amax()


def power_of_two_scale(largest: Tensor) -> Tensor:
    """The power of two (0-dim fp32 tensor) that brings ``largest`` near 2**15: half-precision
    weights then keep the 30 binades of fp16's normal range below it, whatever the loss scale. A
    zero or non-finite ``largest`` (zero upstream gradient; NaN in, NaN out) gives 1."""
    exponent = torch.floor(torch.log2(2.0**14 / largest)).clamp(-126.0, 126.0)
    return torch.where(largest.isfinite() & (largest > 0), torch.exp2(exponent), torch.ones_like(largest))


def weight_scale(complement_, chosen, grad, joint) -> Tensor:
    """The power of two that brings the largest entry of ``W`` near 2**15
    (:func:`power_of_two_scale` of :func:`weight_bound`)."""
    return power_of_two_scale(weight_bound(complement_, chosen, grad, joint))


@dataclass
class Block:
    """Logits of ``rows.x[row_start : row_start + n_rows]`` against ``cols.x[:n_cols]`` and the
    terms of ``W`` they carry (see ``_gradient_weights_kernel``): row terms (lse, weight) indexed
    by block row, column terms for the first ``n_col_terms`` columns, each row's positive value
    (at column ``labels[r]``, or the row's global index), columns left out (``exclude_period``),
    the forward's kept matrix of these logits, if any (the strategy knows what it holds), and the
    adjustment of the row terms' logits."""

    rows: Side
    row_start: int
    n_rows: int
    cols: Side
    n_cols: int
    row_lse: Tensor | None = None
    row_weight: Tensor | None = None
    col_lse: Tensor | None = None
    col_weight: Tensor | None = None
    positive_value: Tensor | None = None
    labels: Tensor | None = None
    exclude_period: int = 0
    kept: Tensor | None = None
    adjustment: Adjustment = NO_ADJUSTMENT

    @property
    def n_col_terms(self) -> int:
        return 0 if self.col_lse is None else self.col_lse.shape[0]

    @property
    def positive_mode(self) -> int:
        if self.positive_value is None:
            return 0
        return 1 if self.labels is None else 2


def kept_views(cache: Tensor, n_local: int, n_queries: int, n_docs: int, doc_block: int, chosen) -> dict:
    """Each direction's ``(n_local, n_cols)`` slice of the matrix the forward kept (empty dict
    when it kept none)."""
    views, offset = {}, 0
    for direction in chosen:
        n_cols, _ = direction_geometry(direction, n_queries, n_docs, doc_block)
        if cache.numel():
            views[direction.name] = cache[offset : offset + n_local * n_cols].view(n_local, n_cols)
        offset += n_local * n_cols
    return views


def blocks(
    q, d, n_local, chosen, lse, complement_, cache, scaled_grad, labels, joint, doc_block, adjustments
) -> list[Block]:  # fmt: skip
    """The blocks of ``W``. doc_to_query's softmax over queries ``k`` for document ``i`` sits in
    column ``i`` of the query_to_doc rectangle (rows ``k < n``) and of the rectangle of gathered
    queries ``k >= n`` against ``d[:n]``: each positive's whole weight is formed in one place.
    ``adjustments``: each direction's row-softmax adjustment, by name."""
    if joint:
        log_z = torch.logsumexp(lse, dim=0)
        terms = {direction.name: (log_z, scaled_grad) for direction in chosen}
    else:
        per_direction = scaled_grad / len(chosen)
        terms = {direction.name: (lse[k], per_direction) for k, direction in enumerate(chosen)}
    kept = kept_views(cache, n_local, q.rows, d.rows, doc_block, chosen)
    row_lse, row_weight = terms["query_to_doc"]
    n_cols, period = direction_geometry(chosen[0], q.rows, d.rows, doc_block)
    positive_value = None
    if chosen[0].has_positive:
        positive_value = positive_values(complement_, chosen, scaled_grad, joint)
    main = Block(
        q, 0, n_local, d, n_cols, row_lse, row_weight, exclude_period=period,
        positive_value=positive_value, labels=labels, kept=kept.get("query_to_doc"),
        adjustment=adjustments["query_to_doc"],
    )  # fmt: skip
    result = [main]
    if "doc_to_query" in terms:
        main.col_lse, main.col_weight = terms["doc_to_query"]
        transposed = kept.get("doc_to_query")
        result.append(
            Block(
                q,
                n_local,
                q.rows - n_local,
                d,
                n_local,
                col_lse=main.col_lse,
                col_weight=main.col_weight,
                kept=None if transposed is None else transposed[:, n_local:].T,
            )
        )
    for direction in chosen[1:]:
        if direction.name == "doc_to_query":
            continue
        rows = cols = q if direction.rows_are_queries else d
        block_lse, block_weight = terms[direction.name]
        n_cols, period = direction_geometry(direction, q.rows, d.rows, doc_block)
        result.append(
            Block(
                rows,
                0,
                n_local,
                cols,
                n_cols,
                block_lse,
                block_weight,
                exclude_period=period,
                kept=kept.get(direction.name),
                adjustment=adjustments[direction.name],
            )
        )
    return result


def memory_budget(chunk_mb, n_queries: int, n_docs: int, dim: int) -> int:
    """Bytes of N x M intermediates one call may hold: ``chunk_mb`` MiB if given, else
    ``SIMCSE_FAST_LOSS_CHUNK_MB``, else the size of the fp32 gradient buffers,
    ``4 (Nq + Nd) D``, and at least ``DEFAULT_BUDGET_FLOOR``. Raises ``ValueError`` for a value
    that is not a positive number."""
    source = "chunk_mb"
    if chunk_mb is None and os.environ.get(CHUNK_ENV_VAR, "").strip():
        source, chunk_mb = f"environment variable {CHUNK_ENV_VAR}", os.environ[CHUNK_ENV_VAR].strip()
        try:
            chunk_mb = float(chunk_mb)
        except ValueError:
            raise ValueError(f"{source} must be a positive number of MiB; got {chunk_mb!r}") from None
    if chunk_mb is None:
        return max(4 * (n_queries + n_docs) * dim, DEFAULT_BUDGET_FLOOR)
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)):
        raise TypeError(f"{source} must be a number of MiB, got {type(chunk_mb).__name__}")
    if not chunk_mb > 0 or chunk_mb == float("inf"):
        raise ValueError(f"{source} must be a positive, finite number of MiB; got {chunk_mb}")
    return max(1, int(chunk_mb * (1 << 20)))
