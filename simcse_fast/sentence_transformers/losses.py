"""sentence-transformers' ``losses`` with the in-batch-negatives losses fused.

Every public name of sentence-transformers' ``losses`` (``sentence_transformer.losses`` from 5.4)
is here too, the same object (``MatryoshkaLoss``, ``CoSENTLoss``, ...), so a script works with
only its import changed; the five losses below are the drop-ins.

Each class subclasses its sentence-transformers namesake, takes exactly its constructor
arguments and returns the same loss with the same gradients, computed by the fused op behind
``simcse_fast.functional.in_batch_negatives_loss``: no ``N x M`` similarity matrix is built,
and the gradient of every logit (the positive's included, whatever the directions) is formed
in fp32 before it is rounded to the embeddings' dtype. For queries ``q`` (the first column),
documents ``d`` (positives, then any hard negatives) and ``s = scale``, the directions compose as

* ``query_to_doc``: ``lse_j s cos(q_i, d_j)`` over all documents;
* ``query_to_query``: ``lse_{k != i} s cos(q_i, q_k)``;
* ``doc_to_query``: ``lse_k s cos(d_i, q_k)`` for each positive ``d_i``;
* ``doc_to_doc``: ``lse`` over every document except query ``i``'s own ones (one per document
  column);

``partition_mode="joint"`` takes the log-sum-exp of the per-direction values (one softmax over
all of them), ``"per_direction"`` their mean, and the loss is
``mean_i(log_z_i - s cos(q_i, d_i))``. ``gather_across_devices`` gathers with gradients as
sentence-transformers does, through ``simcse_fast.distributed.all_gather_with_grad``
(deterministic: no float atomics in its backward).

``hardness_mode`` with ``hardness_strength`` (5.3 and later) weights query_to_doc's selected
negatives by ``alpha stopgrad(cos)`` in the same fused op. ``GISTEmbedLoss`` and
``CachedGISTEmbedLoss`` (guided in-batch negatives) compute the guide's mask inside the same op,
from the guide's embeddings: neither the model's nor the guide's similarity matrix is built.

What the fused path cannot express exactly — a ``similarity_fct`` other than cosine, float64
embeddings (``model.double()``) — runs sentence-transformers' own computation, after one
warning per loss object: never a silently different loss, never a refusal of what
sentence-transformers accepts.

``MatryoshkaLoss`` around one of these losses (hardness weighting and GIST's guide included)
computes every (sampled) Matryoshka dimension in one fused call, ``sum_k w_k
loss(embeddings[:, :d_k])`` with the products of the largest dimension only, where
sentence-transformers runs the inner loss once per dimension. GIST's guide embeddings are not
truncated there (sentence-transformers truncates the model's only): one guide mask serves every
dimension.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import random
import sys
import warnings

import torch
from torch import Tensor

from .. import functional
from ..distributed import all_gather_with_grad, get_rank
from ._compat import cos_sim, embed_columns, reexport, st_losses

__all__ = [
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "GISTEmbedLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "fused_gist_loss",
    "fused_in_batch_negatives_loss",
]


def _rotate_rows(x: Tensor, offset: int) -> Tensor:
    """Rows ``offset..`` first: this process's block of a gathered tensor becomes its first
    rows, the layout ``functional.in_batch_negatives_loss`` expects."""
    return x if offset == 0 else torch.cat([x[offset:], x[:offset]])


def fused_in_batch_negatives_loss(
    embeddings: list[Tensor],
    *,
    scale: float | Tensor,
    directions=("query_to_doc",),
    partition_mode: str = "joint",
    gather_across_devices: bool = False,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    backend: str | None = None,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss from embeddings ``[queries (B, D),
    positives (B, D), negatives_1 (B, D), ...]`` without the similarity matrix (module
    docstring for the formula). All directions, both partition modes and the hardness modes are
    one fused op, so the gradient of each logit, the positive's included, is formed in fp32
    before rounding. ``matryoshka_dims`` / ``matryoshka_weights``: the weighted sum of the loss over
    those prefix dimensions (:func:`simcse_fast.functional.in_batch_negatives_loss`)."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    queries, docs = embeddings[0], list(embeddings[1:])
    batch_size = queries.shape[0]
    offset = 0
    if gather_across_devices:
        queries = all_gather_with_grad(queries)
        docs = [all_gather_with_grad(doc) for doc in docs]
        offset = get_rank() * batch_size
    queries = _rotate_rows(queries, offset)
    docs_all = torch.cat([_rotate_rows(doc, offset) for doc in docs])
    per_query = functional.in_batch_negatives_loss(
        queries, docs_all, n_local=batch_size, scale=scale, directions=tuple(directions),
        partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        backend=backend, matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
    )  # fmt: skip
    return per_query.mean()


def _unfusable_reason(loss, embeddings=()) -> str | None:
    """Why the fused op cannot compute ``loss`` on ``embeddings`` exactly, or None."""
    if _float64(*embeddings):
        return "float64 embeddings"
    similarity_fct = getattr(loss, "similarity_fct", cos_sim)
    if similarity_fct is not cos_sim and getattr(similarity_fct, "__name__", "") != "cos_sim":
        return (
            f"similarity_fct={getattr(similarity_fct, '__name__', similarity_fct)!r} is not cosine similarity"
        )
    return None


def _warn_fallback(loss, reason: str) -> None:
    if not getattr(loss, "_simcse_fast_warned", False):
        warnings.warn(
            f"{type(loss).__name__}: {reason}, which the fused kernels do not compute; using "
            "sentence-transformers' own implementation (same loss, N x M memory).",
            UserWarning,
            stacklevel=3,
        )
        object.__setattr__(loss, "_simcse_fast_warned", True)


def _fused_options(loss, default_directions=("query_to_doc",), default_partition_mode="joint") -> dict:
    """The loss object's options (releases before ``directions`` existed use the defaults), with
    the Matryoshka dimensions and weights while :class:`MatryoshkaLoss` runs it."""
    dims, weights = getattr(loss, "_matryoshka", None) or (None, None)
    return {
        # A tensor scale (an nn.Parameter, a learnable temperature) keeps its gradient.
        "scale": loss.scale if isinstance(loss.scale, Tensor) else float(loss.scale),
        "directions": tuple(getattr(loss, "directions", default_directions)),
        "partition_mode": getattr(loss, "partition_mode", default_partition_mode),
        "gather_across_devices": bool(getattr(loss, "gather_across_devices", False)),
        # 5.3 and later; the releases before have no hardness weighting.
        "hardness_mode": getattr(loss, "hardness_mode", None),
        "hardness_strength": float(getattr(loss, "hardness_strength", 0.0)),
        "matryoshka_dims": dims,
        "matryoshka_weights": weights,
    }


class _GivenEmbeddings(torch.nn.Module):
    """A stand-in model whose features are the sentence embeddings themselves."""

    def forward(self, features: dict) -> dict:
        return features


class _SeveralDimensions:
    """The one place a fused loss declares that it computes several Matryoshka dimensions in one
    call. :class:`MatryoshkaLoss` asks :meth:`several_dims_unfusable_reason` (``None``: it can),
    then runs the loss once inside :meth:`computing_dims`, and the loss's fused path hands the
    dimensions and weights to the fused op (``_fused_options`` reads them). A fused loss joins
    by inheriting this class and passing ``_fused_options``' Matryoshka entries to its op."""

    _matryoshka = None
    """``(dims, weights)`` while :class:`MatryoshkaLoss` runs the loss, else None."""

    def several_dims_unfusable_reason(self) -> str | None:
        """Why this loss object cannot compute several dimensions in one fused call, or None."""
        return _unfusable_reason(self)

    @contextlib.contextmanager
    def computing_dims(self, dims, weights):
        """The loss computes ``sum_k weights[k] loss(embeddings[..., :dims[k]])`` inside the block
        (``dims`` distinct)."""
        reason = self.several_dims_unfusable_reason()
        if reason is not None:
            raise ValueError(f"{type(self).__name__} cannot compute several dimensions at once: {reason}")
        object.__setattr__(self, "_matryoshka", (tuple(dims), tuple(weights)))
        try:
            yield
        finally:
            object.__setattr__(self, "_matryoshka", None)


class _FusedInBatchNegatives(_SeveralDimensions):
    """Mixin: ``compute_loss_from_embeddings`` through the fused primitive, with the
    sentence-transformers computation as the fallback."""

    _default_directions = ("query_to_doc",)
    _default_partition_mode = "joint"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Whether the sentence-transformers class has compute_loss_from_embeddings, which its
        # forward then calls: MultipleNegativesRankingLoss from 5.0, the symmetric one from 5.3.
        cls._base_computes_from_embeddings = hasattr(super(), "compute_loss_from_embeddings")

    def fused_options(self) -> dict:
        return _fused_options(self, self._default_directions, self._default_partition_mode)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        reason = _unfusable_reason(self, embeddings)
        if reason is None:
            return fused_in_batch_negatives_loss(list(embeddings), **self.fused_options())
        _warn_fallback(self, reason)
        if self._matryoshka is None:
            return self._own_loss(embeddings, labels)
        # MatryoshkaLoss handed this call every dimension: sentence-transformers' loss once for each.
        return sum(
            weight * self._own_loss([embedding[..., :dim] for embedding in embeddings], labels)
            for dim, weight in zip(*self._matryoshka, strict=True)
        )

    def _own_loss(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        """sentence-transformers' computation of this loss on ``embeddings``."""
        if self._base_computes_from_embeddings:
            return super().compute_loss_from_embeddings(embeddings, labels)
        # Releases that compute the loss inside forward(): run it on a copy of this loss whose
        # model hands the embeddings through.
        view = copy.copy(self)
        view._modules = {**self._modules, "model": _GivenEmbeddings()}
        features = [{"sentence_embedding": embedding} for embedding in embeddings]
        return super(_FusedInBatchNegatives, view).forward(features, labels)

    def forward(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        if self._base_computes_from_embeddings:
            return super().forward(sentence_features, labels)
        reason = _unfusable_reason(self)
        if reason is not None:
            _warn_fallback(self, reason)
            return super().forward(sentence_features, labels)
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)


class MultipleNegativesRankingLoss(_FusedInBatchNegatives, st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (same constructor and loss),
    computed without the similarity matrix."""


with warnings.catch_warnings():
    # sentence-transformers deprecates this class (use MultipleNegativesRankingLoss with
    # directions=("query_to_doc", "doc_to_query")) and warns when it is subclassed; its users
    # still get that warning when they instantiate it.
    warnings.simplefilter("ignore", DeprecationWarning)

    class MultipleNegativesSymmetricRankingLoss(
        _FusedInBatchNegatives, st_losses.MultipleNegativesSymmetricRankingLoss
    ):
        """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``: ``query_to_doc`` and
        ``doc_to_query``, averaged per direction; computed without the similarity matrix."""

        _default_directions = ("query_to_doc", "doc_to_query")
        _default_partition_mode = "per_direction"


class CachedMultipleNegativesRankingLoss(_SeveralDimensions, st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache: embeddings
    first without gradients, the loss and its gradient on the full batch, then mini-batches
    re-encoded with their saved random states), with the full-batch loss fused: the loss stage
    needs O(B·D) memory instead of mini-batch x full-batch similarity chunks."""

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward=False):
        reason = _unfusable_reason(self, [embedding for column in reps for embedding in column])
        if reason is not None:
            _warn_fallback(self, reason)
            if self._matryoshka is None:
                options = _accepted(super().calculate_loss, labels=labels, with_backward=with_backward)
                return super().calculate_loss(reps, **options)
            options = _accepted(super().calculate_loss, labels=labels)
            base = super().calculate_loss
            return _each_dimension(self, lambda prefixes: base(prefixes, **options), reps, with_backward)
        embeddings = [torch.cat(column) for column in reps]
        loss = fused_in_batch_negatives_loss(embeddings, **_fused_options(self))
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


def _each_dimension(loss: _SeveralDimensions, calculate, reps: list[list[Tensor]], with_backward: bool):
    """A cached loss's fallback inside :class:`MatryoshkaLoss`, which handed ``loss`` every
    dimension: sentence-transformers' loss stage (``calculate``, on mini-batches of embeddings)
    once for each dimension on the prefixes of ``reps``, weighted and summed, and one backward
    through the prefixes when ``with_backward``."""
    total = 0.0
    for dim, weight in zip(*loss._matryoshka, strict=True):
        prefixes = [[part[..., :dim] for part in column] for column in reps]
        total = total + weight * calculate(prefixes)
    if with_backward:
        total.backward()
        total = total.detach()
    return total


def _accepted(method, **arguments) -> dict:
    """The ``arguments`` that ``method`` takes: ``labels`` arrived in 6.x, ``with_backward`` in 3.4;
    before, sentence-transformers never asks for the backward here."""
    parameters = inspect.signature(method).parameters
    return {name: value for name, value in arguments.items() if name in parameters}


def fused_gist_loss(
    embeddings: list[Tensor],
    guide_embeddings: list[Tensor],
    *,
    temperature: float,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    gather_across_devices: bool = False,
    backend: str | None = None,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> Tensor:
    """sentence-transformers' GISTEmbedLoss from the model's embeddings ``[anchors (B, D),
    positives (B, D), negatives_1 (B, D), ...]`` and the guide's of the same texts, without either
    similarity matrix (``simcse_fast.functional.guided_in_batch_negatives_loss``). With
    ``gather_across_devices`` the documents (and the guide's) of every rank are gathered, the
    anchors are not, as in sentence-transformers. ``matryoshka_dims`` / ``matryoshka_weights``: the
    weighted sum of the loss over those prefix dimensions of the model's embeddings, the guide's
    whole at every dimension, in one pass."""
    if len(embeddings) < 2 or len(guide_embeddings) != len(embeddings):
        raise ValueError(
            f"Expected at least 2 embeddings and as many guide embeddings; got {len(embeddings)} and "
            f"{len(guide_embeddings)}"
        )
    anchors, docs = embeddings[0], list(embeddings[1:])
    guide_anchors, guide_docs = guide_embeddings[0], list(guide_embeddings[1:])
    offset = 0
    if gather_across_devices:
        docs = [all_gather_with_grad(doc) for doc in docs]
        guide_docs = [all_gather_with_grad(doc) for doc in guide_docs]
        offset = get_rank() * anchors.shape[0]
    per_anchor = functional.guided_in_batch_negatives_loss(
        anchors, torch.cat([_rotate_rows(doc, offset) for doc in docs]), guide_anchors,
        torch.cat([_rotate_rows(doc, offset) for doc in guide_docs]), n_positives=docs[0].shape[0],
        scale=1.0 / temperature, margin_strategy=margin_strategy, margin=margin,
        contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, backend=backend,
        matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
    )  # fmt: skip
    return per_anchor.mean()


def _gist_options(loss) -> dict:
    """The GIST loss object's options (releases before 4.0 have no margin and contrast options:
    their defaults), with the Matryoshka dimensions and weights while :class:`MatryoshkaLoss` runs
    it."""
    dims, weights = loss._matryoshka or (None, None)
    return {
        "temperature": float(loss.temperature),
        "margin_strategy": getattr(loss, "margin_strategy", "absolute"),
        "margin": float(getattr(loss, "margin", 0.0)),
        "contrast_anchors": bool(getattr(loss, "contrast_anchors", True)),
        "contrast_positives": bool(getattr(loss, "contrast_positives", True)),
        "gather_across_devices": bool(getattr(loss, "gather_across_devices", False)),
        "matryoshka_dims": dims,
        "matryoshka_weights": weights,
    }


def _float64(*tensors: Tensor) -> bool:
    return any(tensor.dtype == torch.float64 for tensor in tensors)


def _float64_model(model) -> bool:
    """Whether ``model`` computes in float64, by its first parameter; a model without parameters
    (sentence-transformers' GIST takes any callable that returns the embeddings) is taken as not:
    the fused loss accepts float64 embeddings too."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first is not None and first.dtype == torch.float64


def _retokenized(loss, features: dict) -> dict:
    """The guide's features of the texts behind ``features`` (guide and model tokenize
    differently): decoded with the model's tokenizer and tokenized with the guide's, as
    sentence-transformers does, flattened batches (``cu_seq_lens_q``) included."""
    input_ids = features["input_ids"]
    if "cu_seq_lens_q" in features:
        flat, offsets = input_ids[0].tolist(), features["cu_seq_lens_q"].tolist()
        input_ids = [flat[start:end] for start, end in itertools.pairwise(offsets)]
    texts = loss.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    tokenize = getattr(loss.guide, "preprocess", None) or loss.guide.tokenize  # tokenize before 5.0
    return {
        key: value.to(loss.guide.device) if isinstance(value, Tensor) else value
        for key, value in tokenize(texts).items()
    }


class _GuidedDimensions(_SeveralDimensions):
    """Mixin of the GIST drop-ins: several Matryoshka dimensions in one fused call, but for a
    float64 model, whose loss is sentence-transformers' own (:class:`MatryoshkaLoss` then runs
    it once per dimension, as sentence-transformers does)."""

    def several_dims_unfusable_reason(self) -> str | None:
        if _float64_model(self.model):
            return "float64 embeddings"
        return None


class GISTEmbedLoss(_GuidedDimensions, st_losses.GISTEmbedLoss):
    """sentence-transformers' ``GISTEmbedLoss`` (same constructor and loss): the guide's mask is
    computed inside the fused op from the guide's embeddings, so neither the model's nor the
    guide's similarity matrices are built. A float64 model runs sentence-transformers' own code
    (after one warning)."""

    def several_dims_unfusable_reason(self) -> str | None:
        if self.guide is self.model:
            # sentence-transformers' MatryoshkaLoss truncates the model's outputs, the guide's too.
            return "the guide is the model itself"
        return super().several_dims_unfusable_reason()

    def forward(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(sentence_features)}")
        if _float64_model(self.model):
            _warn_fallback(self, "float64 embeddings")
            return super().forward(sentence_features, labels)
        # The guide reads copies: the model writes its outputs into the features it is given.
        guide_features = [dict(features) for features in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [_retokenized(self, features) for features in sentence_features]
            guide_embeddings = embed_columns(self.guide, guide_features)
        return fused_gist_loss(embeddings, guide_embeddings, **_gist_options(self))


class CachedGISTEmbedLoss(_GuidedDimensions, st_losses.CachedGISTEmbedLoss):
    """sentence-transformers' ``CachedGISTEmbedLoss`` (GradCache), with the full-batch guided
    loss fused: the loss stage needs O(B·D) memory instead of mini-batch x full-batch similarity
    chunks of the model and of the guide."""

    def calculate_loss(self, reps, reps_guided, *args, with_backward: bool = False, **kwargs) -> Tensor:
        embeddings = [torch.cat(column) for column in reps]
        if _float64(*embeddings):
            _warn_fallback(self, "float64 embeddings")
            if self._matryoshka is None:
                return super().calculate_loss(reps, reps_guided, *args, with_backward=with_backward, **kwargs)
            base = super().calculate_loss
            return _each_dimension(
                self, lambda prefixes: base(prefixes, reps_guided, *args, **kwargs), reps, with_backward
            )
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        guide_embeddings = [torch.cat(column) for column in reps_guided]
        loss = fused_gist_loss(embeddings, guide_embeddings, **_gist_options(self))
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


_ST_MATRYOSHKA = sys.modules[st_losses.MatryoshkaLoss.__module__]


def _sampled_dims(dims, weights, n_dims_per_step: int) -> tuple[list[int], list[float]]:
    """The dimensions of one step and their weights, drawn as sentence-transformers draws them
    (``random.sample`` of the indices when ``0 < n_dims_per_step < len(dims)``: the same draws
    from Python's ``random``, so a seeded run picks the same dimensions); a dimension listed twice
    gets the sum of its weights (its loss counted twice)."""
    indices = range(len(dims))
    if 0 < n_dims_per_step < len(indices):
        indices = random.sample(indices, n_dims_per_step)
    merged: dict[int, float] = {}
    for index in indices:
        merged[dims[index]] = merged.get(dims[index], 0.0) + float(weights[index])
    return list(merged), list(merged.values())


def _computes_dims(loss) -> bool:
    return isinstance(loss, _SeveralDimensions) and loss.several_dims_unfusable_reason() is None


class _CachedDimsAtOnce:
    """Stands in for sentence-transformers' ``CachedLossDecorator`` on a fused cached loss's
    ``calculate_loss``: the decorator's own draw of dimensions, then one fused call on the
    full-dimension embeddings, whose backward leaves every dimension's gradient in them at once.
    The decorator itself runs when the loss cannot (an option the fused op does not compute)."""

    def __init__(self, decorator, loss):
        self.decorator, self.loss = decorator, loss

    def __call__(self, reps, *args, **kwargs):
        decorator = self.decorator
        if not _computes_dims(self.loss):
            return decorator(reps, *args, **kwargs)
        # Releases before 5.x never passed n_dims_per_step to the decorator: all dimensions.
        dims, weights = _sampled_dims(
            decorator.matryoshka_dims, decorator.matryoshka_weights, getattr(decorator, "n_dims_per_step", -1)
        )
        with self.loss.computing_dims(dims, weights):
            return decorator.fn(reps, *args, **kwargs)


class MatryoshkaLoss(st_losses.MatryoshkaLoss):
    """sentence-transformers' ``MatryoshkaLoss`` (same constructor, the same draw of dimensions
    with ``n_dims_per_step``, the same loss and gradients) that, around
    ``MultipleNegativesRankingLoss``, ``MultipleNegativesSymmetricRankingLoss``,
    ``CachedMultipleNegativesRankingLoss`` (hardness weighting included), ``GISTEmbedLoss`` or
    ``CachedGISTEmbedLoss`` from this module, computes all the step's dimensions in one fused
    call: ``sum_k w_k loss(e[:, :d_k])`` (each prefix normalized on its own; GIST's guide
    embeddings whole, as sentence-transformers leaves them) with the GEMM work of the largest
    dimension and O(N M) elementwise work per dimension, where sentence-transformers computes the
    inner loss once per dimension (2.25x the products for 768, 512, 256, 128, 64). Around any other
    loss, or an option the fused loss does not compute, it is sentence-transformers' class
    unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The cached losses compute from per-mini-batch embeddings: sentence-transformers
        # decorates their calculate_loss; the fused one takes every dimension in that one call.
        decorator = vars(self.loss).get("calculate_loss")
        if isinstance(self.loss, _SeveralDimensions) and isinstance(
            decorator, _ST_MATRYOSHKA.CachedLossDecorator
        ):
            self.loss.calculate_loss = _CachedDimsAtOnce(decorator, self.loss)

    def forward(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        if "calculate_loss" in vars(self.loss) or not _computes_dims(self.loss):
            return super().forward(sentence_features, labels)
        dims, weights = _sampled_dims(self.matryoshka_dims, self.matryoshka_weights, self.n_dims_per_step)
        with self.loss.computing_dims(dims, weights):
            return self.loss(sentence_features, labels)


MatryoshkaLoss.__init__.__signature__ = inspect.signature(st_losses.MatryoshkaLoss.__init__)


# Everything else of sentence-transformers' module, under this one: one import swap suffices.
__all__, __getattr__, __dir__ = reexport(globals(), st_losses)
