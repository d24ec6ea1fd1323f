"""The losses embedding trainers combine with in-batch negatives, fused: sentence-transformers'
hardness weighting (MNRL and CachedMNRL, 5.3 and later) and GISTEmbedLoss / CachedGISTEmbedLoss,
each against sentence-transformers' own class: every mode and option it accepts, gathered ranks,
the cached variants, the Triton strategies under the interpreter, half precision by the 2x-eager
rule."""

from __future__ import annotations

import copy
import functools
import inspect
import random
import sys
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")

from inputs import SENTENCES, assert_within_eager, cpu_backends
from loss_checks import FORWARD_TOLERANCE, GRADIENT_TOLERANCE, assert_close_scaled
from test_matryoshka import EmbeddingColumns, assert_same_runs, matryoshka_run
from test_sentence_transformers import (
    COLUMNS,
    OPTION_CASES,
    easy_columns,
    loss_and_grads,
    make_model,
    random_columns,
    scaled_grads,
    tokenize,
)

from simcse_fast import functional, similarity
from simcse_fast.sentence_transformers import losses, models
from simcse_fast.sentence_transformers._compat import st_losses
from simcse_fast.similarity import matryoshka, numerics, select

HAS_HARDNESS = (
    "hardness_mode" in inspect.signature(st_losses.MultipleNegativesRankingLoss.__init__).parameters
)
needs_hardness = pytest.mark.skipif(
    not HAS_HARDNESS, reason="this sentence-transformers has no hardness_mode (5.3)"
)
HARDNESS_MODES = ["in_batch_negatives", "hard_negatives", "all_negatives"]
# The Triton strategies under the interpreter (CPU, fp32) beside the default torch path.
STRATEGIES = [("auto", None)] + (
    [("triton", "fused"), ("triton", "gemm")] if "triton" in cpu_backends() else []
)


@pytest.fixture
def strategy(request, monkeypatch):
    backend, pinned = request.param
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", backend)
    if pinned is not None:
        monkeypatch.setenv(select.STRATEGY_ENV_VAR, pinned)
    return request.param


def assert_same(ours, theirs, what=""):
    (value, grads), (expected, expected_grads) = ours, theirs
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} loss: {m}")
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        torch.testing.assert_close(
            grad, expected_grad, rtol=1e-5, atol=1e-5, msg=lambda m, i=index: f"{what} d column {i}: {m}"
        )


def as_rank_one_of_three(monkeypatch, their_class, truncatable: bool = False) -> None:
    """Rank 1 of 3 for our losses and ``their_class``'s module: the other ranks' rows are a
    deterministic function of the local ones (no gradient). ``truncatable``: the local rows
    rolled and scaled row by row, a function that commutes with MatryoshkaLoss's truncating and
    normalizing, as real gathering does (each rank gathers the others' truncated embeddings)."""

    def all_gather_with_grad(x):
        if truncatable:
            scales = torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None]
            others = [torch.roll(x.detach(), rank + 1, dims=0) * scales for rank in (0, 2)]
        else:
            others = [torch.flip(x.detach(), dims=[0]) * (rank + 0.5) + rank for rank in (0, 2)]
        return torch.cat([others[0], x, others[1]])

    for module in (sys.modules[losses.__name__], sys.modules[their_class.__module__]):
        monkeypatch.setattr(module, "all_gather_with_grad", all_gather_with_grad)
        monkeypatch.setattr(module, "get_rank", lambda: 1)


# Hardness weighting.


@needs_hardness
@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True, ids=lambda s: "-".join(filter(None, s)))
@pytest.mark.parametrize("mode", HARDNESS_MODES)
@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: f"{'+'.join(o['directions'])}-{o['partition_mode']}"
)
def test_hardness_matches_sentence_transformers(options, mode, strategy, generator):
    """Each hardness mode with every direction and partition mode, pairs and two hard negatives:
    the loss and gradients of sentence-transformers' MultipleNegativesRankingLoss."""
    if strategy[0] == "triton" and options["directions"] not in (("query_to_doc",), DIRECTION_PAIR):
        pytest.skip("the interpreter runs the two main layouts; the torch path covers every one")
    for n_columns in (2, 4):
        columns = random_columns(n_columns, generator)
        kwargs = {**options, "hardness_mode": mode, "hardness_strength": 5.0}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fused: no fallback warning
            ours = loss_and_grads(losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns)
        theirs = loss_and_grads(st_losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns)
        assert_same(ours, theirs, f"{mode} {options} {n_columns} columns")


DIRECTION_PAIR = ("query_to_doc", "doc_to_query")


@needs_hardness
@pytest.mark.parametrize("mode", HARDNESS_MODES)
def test_cached_hardness_matches_sentence_transformers(mode, tiny_bert_dir, generator):
    """CachedMultipleNegativesRankingLoss's loss stage with hardness weighting, on mini-batches
    of precomputed embeddings."""
    model = make_model(tiny_bert_dir, models.Pooling)
    reps = [[column[:3], column[3:]] for column in random_columns(3, generator)]
    values = []
    for loss_class in (
        losses.CachedMultipleNegativesRankingLoss,
        st_losses.CachedMultipleNegativesRankingLoss,
    ):
        leaves = [[part.clone().requires_grad_() for part in column] for column in reps]
        loss = loss_class(model, mini_batch_size=2, hardness_mode=mode, hardness_strength=9.0)
        value = loss.calculate_loss(leaves, with_backward=True)
        values.append((value, [torch.cat([part.grad for part in column]) for column in leaves]))
    assert_same(*values, f"cached {mode}")


@needs_hardness
@pytest.mark.parametrize("mode", HARDNESS_MODES)
def test_gathered_hardness_matches_sentence_transformers(mode, generator, monkeypatch):
    """Rank 1 of 3, the other ranks' rows stubbed in: a query's own documents are its local
    positive and hard negatives, wherever the rank's block lies."""
    as_rank_one_of_three(monkeypatch, st_losses.MultipleNegativesRankingLoss)
    columns = random_columns(3, generator)
    kwargs = {"gather_across_devices": True, "hardness_mode": mode, "hardness_strength": 5.0}
    kwargs["directions"] = DIRECTION_PAIR
    ours = loss_and_grads(losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns)
    theirs = loss_and_grads(st_losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns)
    assert_same(ours, theirs, f"gathered {mode}")


@needs_hardness
@pytest.mark.parametrize("mode", HARDNESS_MODES)
@pytest.mark.parametrize("gathered", [False, True], ids=["local", "gathered"])
def test_hardness_in_row_chunks_matches_sentence_transformers(mode, gathered, generator, monkeypatch):
    """A 1 KiB budget: rows in chunks of a few, so chunks start past a query's own documents (the
    hardness masks are sparse per chunk); 37 rows and two hard negatives, every direction."""
    monkeypatch.setenv(numerics.CHUNK_ENV_VAR, str(1 / 1024))
    if gathered:
        as_rank_one_of_three(monkeypatch, st_losses.MultipleNegativesRankingLoss)
    columns = random_columns(4, generator, batch=37)
    kwargs = {"hardness_mode": mode, "hardness_strength": 5.0, "gather_across_devices": gathered}
    kwargs["directions"] = DIRECTION_PAIR if gathered else OPTION_CASES[-1]["directions"]
    ours = loss_and_grads(losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns)
    theirs = loss_and_grads(st_losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns)
    assert_same(ours, theirs, f"chunked {mode}")


HALF_CASES = [("torch", torch.bfloat16, 1.0), ("torch", torch.float16, 2.0**14)]
if "triton" in cpu_backends():
    HALF_CASES.append(("triton", torch.float16, 2.0**14))


@needs_hardness
@pytest.mark.parametrize(
    "backend, dtype, loss_scale", HALF_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_hardness_half_precision_within_twice_eager(backend, dtype, loss_scale, generator, monkeypatch):
    """Easy positives, 256 queries with a hard negative each, EmbeddingGemma's strength 5 on the
    hard negatives: flash-attention's rule against sentence-transformers in the same dtype."""
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", backend)
    kwargs = {"hardness_mode": "all_negatives", "hardness_strength": 5.0}
    columns = easy_columns(256, 64, generator)
    half = [column.to(dtype) for column in columns]
    truth = scaled_grads(
        st_losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), [c.double() for c in half], 1.0
    )
    eager = scaled_grads(st_losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), half, loss_scale)
    ours = scaled_grads(losses.MultipleNegativesRankingLoss(COLUMNS, **kwargs), half, loss_scale)
    names = ("queries", "positives", "negatives")
    assert_within_eager(ours, eager, truth, dtype, loss_scale, f"hardness {backend} {dtype}", names)


# GIST.

GIST_ARGUMENTS = inspect.signature(st_losses.GISTEmbedLoss.__init__).parameters
GIST_OPTIONS = [
    {},
    {"margin_strategy": "absolute", "margin": 0.1},
    {"margin_strategy": "relative", "margin": 0.05},
    {"contrast_anchors": False},
    {"contrast_positives": False},
    {"contrast_anchors": False, "contrast_positives": False, "margin": 0.02},
]


def gist_options(options: dict) -> dict:
    """``options`` where the release takes them (4.0 added the margins and contrast flags)."""
    missing = [name for name in options if name not in GIST_ARGUMENTS]
    if missing:
        pytest.skip(f"this sentence-transformers' GISTEmbedLoss has no argument {', '.join(missing)}")
    return options


@pytest.fixture(scope="module")
def guide_model(tiny_bert_dir):
    """A second tiny model with other weights and the same vocabulary: the guide."""
    guide = make_model(tiny_bert_dir)
    with torch.no_grad():
        for parameter in guide.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    return guide


def assert_parameter_grads_close(ours: dict, theirs: dict, truth: dict) -> None:
    """Each parameter's gradient from our loss within twice the error of sentence-transformers'
    fp32 gradient against the float64 truth, plus an atol of 1e-4 of the gradient's largest
    magnitude (at least 1). The embeddings' gradients meet the row-by-row rule with fp32's atol
    of 1e-5 (the cached and half-precision tests); backpropagated through the encoder, GIST's
    scale of 100 and sums over every token take both fp32 computations a few times further,
    and the key bias's true gradient is zero (softmax ignores it), so its error is absolute.
    Where identical texts tie the guide's threshold, fp32 and float64 may mask differently:
    both fp32 computations then stand equally far from the truth."""
    assert ours.keys() == theirs.keys() == truth.keys() and len(ours) > 10
    for name, exact in truth.items():
        our_error = (ours[name].double() - exact).abs().max().item()
        their_error = (theirs[name].double() - exact).abs().max().item()
        atol = 1e-4 * max(1.0, exact.abs().max().item())
        assert our_error <= 2 * their_error + atol, (
            f"{name}: error {our_error:.2e} against float64, sentence-transformers' {their_error:.2e}"
        )


def float64_parameter_grads(build_loss, model, guide, columns):
    """The gradients of ``build_loss(model, guide)`` (sentence-transformers' classes) with both
    models in float64: the truth both fp32 computations are judged against."""
    model64 = copy.deepcopy(model).double()
    guide64 = copy.deepcopy(guide).double() if guide is not None else None
    return gist_parameter_grads(model64, build_loss(model64, guide64), columns)


def gist_parameter_grads(model, loss, columns):
    model.zero_grad()
    value = loss([tokenize(model, column) for column in columns], torch.empty(0))
    value.backward()
    return value.detach(), {
        name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
    }


GIST_COLUMNS = {
    "pairs": [SENTENCES, SENTENCES[::-1]],
    "triplets": [SENTENCES, SENTENCES[::-1], SENTENCES[1:] + SENTENCES[:1]],
    # SimCSE's pairs: a text and itself, so the guide's anchor and positive embeddings are
    # identical and the guide's self-similarities tie with the threshold.
    "identical": [SENTENCES, SENTENCES],
}


@pytest.mark.parametrize("columns", list(GIST_COLUMNS))
@pytest.mark.parametrize(
    "options", GIST_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_gist_matches_sentence_transformers(options, columns, tiny_bert_dir, guide_model):
    options = gist_options(options)
    model = make_model(tiny_bert_dir, models.Pooling)
    texts = GIST_COLUMNS[columns]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = gist_parameter_grads(model, losses.GISTEmbedLoss(model, guide_model, **options), texts)
    theirs = gist_parameter_grads(model, st_losses.GISTEmbedLoss(model, guide_model, **options), texts)
    truth = float64_parameter_grads(
        lambda m, g: st_losses.GISTEmbedLoss(m, g, **options), model, guide_model, texts
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert_parameter_grads_close(ours[1], theirs[1], truth[1])


def gist_reps(generator, n_columns=3, batch=6, dim=16, guide_dim=12):
    """Mini-batches of model and guide embeddings; the guide's positives near its anchors so
    that some in-batch candidates pass the threshold and some do not."""
    anchors = torch.randn(batch, guide_dim, generator=generator)
    guide = [anchors] + [
        anchors + 0.9 * torch.randn(batch, guide_dim, generator=generator) for _ in range(n_columns - 1)
    ]
    model = [torch.randn(batch, dim, generator=generator) for _ in range(n_columns)]
    split = [[column[:4], column[4:]] for column in model]
    return split, [[column[:4], column[4:]] for column in guide]


def assert_gist_close(ours, theirs, truth, what=""):
    """``(loss, gradients)``: the loss within 1e-5 of sentence-transformers' fp32 loss, and loss
    and each gradient within the fp32 tolerance of tests/loss_checks.py (2e-5 of the largest
    magnitude) of the float64 truth: GIST's scale of 100 takes fp32 gradients, sentence-
    transformers' own among them, beyond a fixed 1e-5 of each other."""
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} loss: {m}")
    assert_close_scaled(ours[0], truth[0], FORWARD_TOLERANCE[torch.float32], f"{what} loss")
    for index, (grad, exact) in enumerate(zip(ours[1], truth[1], strict=True)):
        assert_close_scaled(grad, exact, GRADIENT_TOLERANCE[torch.float32], f"{what} d column {index}")


def cached_gist_loss(loss_class, model, guide_model, reps, reps_guided, **options):
    leaves = [[part.clone().requires_grad_() for part in column] for column in reps]
    loss = loss_class(model, guide_model, mini_batch_size=3, **options)
    value = loss.calculate_loss(leaves, reps_guided, with_backward=True)
    return value, [torch.cat([part.grad for part in column]) for column in leaves]


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True, ids=lambda s: "-".join(filter(None, s)))
@pytest.mark.parametrize("n_columns", [2, 3, 4], ids=lambda n: f"{n - 2}-negatives")
@pytest.mark.parametrize(
    "options", GIST_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_cached_gist_matches_sentence_transformers(
    options, n_columns, strategy, tiny_bert_dir, guide_model, generator
):
    """CachedGISTEmbedLoss's loss stage: precomputed model and guide embeddings, every option,
    several hard negatives, each strategy, against sentence-transformers' fp32 loss and its
    float64 truth."""
    options = gist_options(options)
    model = make_model(tiny_bert_dir, models.Pooling)
    reps, reps_guided = gist_reps(generator, n_columns)
    ours = cached_gist_loss(losses.CachedGISTEmbedLoss, model, guide_model, reps, reps_guided, **options)
    theirs = cached_gist_loss(st_losses.CachedGISTEmbedLoss, model, guide_model, reps, reps_guided, **options)
    reps64, guided64 = ([[part.double() for part in column] for column in r] for r in (reps, reps_guided))
    truth = cached_gist_loss(st_losses.CachedGISTEmbedLoss, model, guide_model, reps64, guided64, **options)
    assert_gist_close(ours, theirs, truth, f"cached GIST {options}")


@pytest.mark.skipif("gather_across_devices" not in GIST_ARGUMENTS, reason="GIST gathers from 5.1")
def test_gathered_gist_matches_sentence_transformers(tiny_bert_dir, guide_model, generator, monkeypatch):
    """Rank 1 of 3 with the other ranks' documents stubbed in: anchors stay local, documents and
    the guide's documents are gathered, the positive is at the rank's offset."""
    as_rank_one_of_three(monkeypatch, st_losses.CachedGISTEmbedLoss)
    model = make_model(tiny_bert_dir, models.Pooling)
    reps, reps_guided = gist_reps(generator, 3)
    options = {"gather_across_devices": True, "margin": 0.05}
    ours = cached_gist_loss(losses.CachedGISTEmbedLoss, model, guide_model, reps, reps_guided, **options)
    theirs = cached_gist_loss(st_losses.CachedGISTEmbedLoss, model, guide_model, reps, reps_guided, **options)
    assert_same(ours, theirs, "gathered GIST")


@pytest.mark.parametrize(
    "backend, dtype, loss_scale", HALF_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_gist_half_precision_within_twice_eager(
    backend, dtype, loss_scale, tiny_bert_dir, guide_model, generator, monkeypatch
):
    """Easy positives, 256 anchors with a hard negative, the guide's embeddings near the model's:
    flash-attention's rule against sentence-transformers' CachedGISTEmbedLoss in the same dtype."""
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", backend)
    model = make_model(tiny_bert_dir, models.Pooling)
    columns = easy_columns(256, 64, generator)
    guide = [(column[:, :32] + 0.1 * torch.randn(256, 32, generator=generator, dtype=torch.float64)).float()
             for column in columns]  # fmt: skip
    grads = {}
    for name, loss_class, cast, loss_scale_used in (
        ("truth", st_losses.CachedGISTEmbedLoss, torch.float64, 1.0),
        ("eager", st_losses.CachedGISTEmbedLoss, dtype, loss_scale),
        ("ours", losses.CachedGISTEmbedLoss, dtype, loss_scale),
    ):
        reps = [[column.to(dtype).to(cast)] for column in columns]
        leaves = [[part.clone().requires_grad_() for part in column] for column in reps]
        loss = loss_class(model, guide_model, temperature=0.05, mini_batch_size=64)
        value = loss.calculate_loss(leaves, [[g.to(cast)] for g in guide])
        (value * loss_scale_used).backward()
        grads[name] = [column[0].grad.double() / loss_scale_used for column in leaves]
    names = ("anchors", "positives", "negatives")
    what = f"GIST {backend} {dtype}"
    assert_within_eager(grads["ours"], grads["eager"], grads["truth"], dtype, loss_scale, what, names)


def test_no_fallback_remains_for_hardness_or_gist():
    """The fused drop-ins exist for every loss of the issue and fall back only where
    sentence-transformers' own computation is the only exact one (another similarity_fct, float64)."""
    for name in ("GISTEmbedLoss", "CachedGISTEmbedLoss", "MultipleNegativesRankingLoss",
                 "CachedMultipleNegativesRankingLoss"):  # fmt: skip
        ours, theirs = getattr(losses, name), getattr(st_losses, name)
        assert ours is not theirs and issubclass(ours, theirs), name
    source = inspect.getsource(losses)
    assert "hardness_mode=" not in source.split("def _unfusable_reason", 1)[1].split("def ", 1)[0]


def test_gist_takes_a_model_without_parameters(generator):
    """sentence-transformers' GIST takes any callable that returns the embeddings (its own tests
    build the loss so, on precomputed embeddings): the drop-in too, with the same loss and
    gradients."""
    columns = [torch.randn(6, 8, generator=generator) for _ in range(3)]
    results = {}
    for name, cls in (("ours", losses.GISTEmbedLoss), ("theirs", st_losses.GISTEmbedLoss)):
        loss = cls.__new__(cls)
        torch.nn.Module.__init__(loss)
        options = {
            "temperature": 0.05, "similarity_fct": torch.nn.CosineSimilarity(dim=-1),
            "must_retokenize": False,
            "cross_entropy_loss": torch.nn.CrossEntropyLoss(), "margin_strategy": "absolute", "margin": 0.0,
            "contrast_anchors": True, "contrast_positives": True, "gather_across_devices": False,
        }  # fmt: skip
        for attribute, value in options.items():
            setattr(loss, attribute, value)
        loss.model = loss.guide = lambda features: {"sentence_embedding": features["sentence_embedding"]}
        leaves = [column.clone().requires_grad_() for column in columns]
        value = loss([{"sentence_embedding": leaf} for leaf in leaves], None)
        value.backward()
        results[name] = [value.detach()] + [leaf.grad for leaf in leaves]
    for ours, theirs in zip(results["ours"], results["theirs"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_guided_loss_refuses_a_margin_that_is_not_a_number():
    anchors, docs, guide = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    for margin, error in ((float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)):
        with pytest.raises(error, match="margin must be a number"):
            functional.guided_in_batch_negatives_loss(
                anchors, docs, guide, guide, n_positives=4, margin=margin
            )


def _gloo_worker(rank: int, world: int, store: str, out_dir: str, model_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(rank)
        results = {}
        columns = random_columns(3, generator)
        kwargs = {
            "gather_across_devices": True,
            "hardness_mode": "in_batch_negatives",
            "hardness_strength": 5.0,
        }
        kwargs["directions"] = DIRECTION_PAIR
        for side, module in (("ours", losses), ("theirs", st_losses)):
            results["hardness", side] = loss_and_grads(
                module.MultipleNegativesRankingLoss(COLUMNS, **kwargs), columns
            )
        model, guide = make_model(model_dir, models.Pooling), make_model(model_dir)
        reps, reps_guided = gist_reps(generator, 3)
        options = {"gather_across_devices": True, "margin": 0.05}
        for side, module in (("ours", losses), ("theirs", st_losses)):
            results["gist", side] = cached_gist_loss(
                module.CachedGISTEmbedLoss, model, guide, reps, reps_guided, **options
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_hardness
@pytest.mark.skipif("gather_across_devices" not in GIST_ARGUMENTS, reason="GIST gathers from 5.1")
def test_gathered_across_gloo_ranks_matches_sentence_transformers(tiny_bert_dir, tmp_path):
    """Two gloo processes: on each rank, hardness-weighted MNRL and CachedGIST with
    gather_across_devices give sentence-transformers' loss and local gradients."""
    import torch.multiprocessing as mp

    mp.spawn(
        _gloo_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path), str(tiny_bert_dir)),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("hardness", "gist"):
            assert_same(results[name, "ours"], results[name, "theirs"], f"rank {rank} {name}")


# MatryoshkaLoss over hardness weighting and GIST: every dimension in one fused pass.

MATRYOSHKA_STRATEGIES = [("auto", None)] + ([("triton", "gemm")] if "triton" in cpu_backends() else [])
"""The one-pass op's strategies: torch, and gemm under the interpreter (a fused tile runs gemm)."""
MATRYOSHKA_ARGUMENTS = [
    {"matryoshka_dims": [16, 8, 3]},
    {"matryoshka_dims": [16, 8, 5, 3], "matryoshka_weights": [1, 2, 0.5, 3], "n_dims_per_step": 2},
]


def strategy_id(strategy) -> str:
    return "-".join(filter(None, strategy))


def interpreted_sparingly(cases):
    """``pytest.param``s of ``(*values, strategy)`` for each case ``(id, values, under the
    interpreter too)`` and each of ``MATRYOSHKA_STRATEGIES``: the interpreter runs the cases so
    marked, the torch path every one."""
    return [
        pytest.param(*values, strategy, id=f"{case_id}-{strategy_id(strategy)}")
        for case_id, values, interpreted in cases
        for strategy in MATRYOSHKA_STRATEGIES
        if interpreted or strategy[0] != "triton"
    ]


HARDNESS_LAYOUTS = interpreted_sparingly(
    (
        f"{'+'.join(o['directions'])}-{o['partition_mode']}",
        (o,),
        o["directions"] in (("query_to_doc",), DIRECTION_PAIR),
    )
    for o in OPTION_CASES
)
"""Every direction and partition mode; the two main layouts under the interpreter."""


@needs_hardness
@pytest.mark.parametrize("mode", HARDNESS_MODES)
@pytest.mark.parametrize("options, strategy", HARDNESS_LAYOUTS, indirect=["strategy"])
def test_matryoshka_over_hardness_matches_sentence_transformers(options, strategy, mode, generator):
    """MatryoshkaLoss over hardness-weighted MNRL: each mode with every direction and partition
    mode; pairs at every dimension, then two hard negatives with weights and two dimensions drawn a
    step. The loss, the gradients and the draw of sentence-transformers' classes."""
    model = EmbeddingColumns(16)
    kwargs = {**options, "hardness_mode": mode, "hardness_strength": 5.0}
    for seed, (n_columns, arguments) in enumerate(zip((2, 4), MATRYOSHKA_ARGUMENTS, strict=True)):
        columns = random_columns(n_columns, generator)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fused: no fallback warning
            ours = matryoshka_run(
                losses.MatryoshkaLoss, losses.MultipleNegativesRankingLoss(model, **kwargs), columns,
                arguments, seed,
            )  # fmt: skip
        theirs = matryoshka_run(
            st_losses.MatryoshkaLoss, st_losses.MultipleNegativesRankingLoss(model, **kwargs), columns,
            arguments, seed, sort_draw=True,
        )  # fmt: skip
        assert_same_runs(ours, theirs)


@needs_hardness
@pytest.mark.parametrize("strategy", MATRYOSHKA_STRATEGIES, indirect=True, ids=strategy_id)
@pytest.mark.parametrize("gathered", [False, True], ids=["local", "gathered"])
def test_matryoshka_over_hardness_in_row_chunks_matches_sentence_transformers(
    gathered, strategy, generator, monkeypatch
):
    """A 1 KiB budget and small sub-blocks: chunks of a row or two, so most start past a query's
    own documents (two hard negatives: the hardness masks are sparse per chunk); every mode, every
    direction (rank 1 of 3 stubbed in when gathered)."""
    monkeypatch.setenv(numerics.CHUNK_ENV_VAR, str(1 / 1024))
    monkeypatch.setattr(matryoshka, "SUB_BLOCK_ELEMENTS", 64)
    if gathered:
        as_rank_one_of_three(monkeypatch, st_losses.MultipleNegativesRankingLoss, truncatable=True)
    batch = 11 if strategy[0] == "triton" else 29
    directions = DIRECTION_PAIR if gathered else OPTION_CASES[-1]["directions"]
    model = EmbeddingColumns(16)
    for mode in HARDNESS_MODES:
        columns = random_columns(4, generator, batch=batch)
        kwargs = {"hardness_mode": mode, "hardness_strength": 5.0, "gather_across_devices": gathered,
                  "directions": directions}  # fmt: skip
        runs = []
        for module in (losses, st_losses):
            inner = module.MultipleNegativesRankingLoss(model, **kwargs)
            runs.append(matryoshka_run(module.MatryoshkaLoss, inner, columns, MATRYOSHKA_ARGUMENTS[0], 0))
        assert_same_runs(*runs)


def cached_matryoshka_run(module, inner, reps, arguments, seed, *extra):
    """``module.MatryoshkaLoss`` around a cached loss: its decorated loss stage on mini-batches of
    embeddings (``extra``: the guide's), the loss, the gradients of the columns and the next value
    of Python's ``random``."""
    loss = module.MatryoshkaLoss(inner.model, inner, **arguments)
    leaves = [[part.clone().requires_grad_() for part in column] for column in reps]
    random.seed(seed)
    value = loss.loss.calculate_loss(leaves, *extra, with_backward=True)
    return value, [torch.cat([part.grad for part in column]) for column in leaves], random.random()


@needs_hardness
@pytest.mark.parametrize("mode", HARDNESS_MODES)
def test_matryoshka_over_cached_hardness_matches_sentence_transformers(mode, tiny_bert_dir, generator):
    """CachedMultipleNegativesRankingLoss's loss stage inside MatryoshkaLoss, mini-batches of
    embeddings, weights and two dimensions drawn a step."""
    model = make_model(tiny_bert_dir, models.Pooling)
    reps = [[column[:4], column[4:]] for column in random_columns(3, generator, batch=7)]
    kwargs = {"mini_batch_size": 2, "hardness_mode": mode, "hardness_strength": 9.0}
    runs = []
    for module in (losses, st_losses):
        inner = module.CachedMultipleNegativesRankingLoss(model, **kwargs)
        runs.append(cached_matryoshka_run(module, inner, reps, MATRYOSHKA_ARGUMENTS[1], 3))
    assert_same_runs(*runs)


def gist_matryoshka_runs(inner, reps, reps_guided, arguments, seed):
    """Our MatryoshkaLoss around ``inner(losses)`` (a CachedGISTEmbedLoss) and
    sentence-transformers' around ``inner(st_losses)``, in fp32, and sentence-transformers' on the
    same embeddings in float64: their runs (``cached_matryoshka_run``)."""
    runs = [cached_matryoshka_run(module, inner(module), reps, arguments, seed, reps_guided)
            for module in (losses, st_losses)]  # fmt: skip
    reps64, guided64 = ([[part.double() for part in column] for column in r] for r in (reps, reps_guided))
    return (*runs, cached_matryoshka_run(st_losses, inner(st_losses), reps64, arguments, seed, guided64))


def assert_gist_runs_close(ours, theirs, truth):
    """The draw of dimensions of the three runs (``cached_matryoshka_run``) the same; their losses
    and gradients by :func:`assert_gist_close`. The one pass, whose prefixes' radial terms come
    from ``W_k`` and the cosines (matryoshka.py's docstring), lands 2-4x further from the truth
    than sentence-transformers' fp32 gradients do, within that tolerance."""
    assert ours[2] == theirs[2] == truth[2], "the draw of dimensions consumed Python's random differently"
    assert_gist_close(ours[:2], theirs[:2], truth[:2])


@pytest.mark.parametrize(
    "options, n_columns, strategy",
    interpreted_sparingly(
        (
            f"{','.join(f'{k}={v}' for k, v in o.items()) or 'default'}-{n - 2}-negatives",
            (o, n),
            not o and n < 4,
        )
        for o in GIST_OPTIONS
        for n in (2, 3, 4)
    ),
    indirect=["strategy"],
)
def test_matryoshka_over_cached_gist_matches_sentence_transformers(
    options, n_columns, strategy, tiny_bert_dir, guide_model, generator
):
    """CachedGISTEmbedLoss's loss stage inside MatryoshkaLoss: every option, hard negatives (the
    interpreter: the default options without and with one); the guide's embeddings whole at
    every dimension (sentence-transformers truncates the model's only); the draw of two
    dimensions a step with weights."""
    options = gist_options(options)
    model = make_model(tiny_bert_dir, models.Pooling)
    reps, reps_guided = gist_reps(generator, n_columns)
    for seed, arguments in enumerate(MATRYOSHKA_ARGUMENTS):
        runs = gist_matryoshka_runs(
            lambda module: module.CachedGISTEmbedLoss(model, guide_model, mini_batch_size=3, **options),
            reps, reps_guided, arguments, seed,
        )  # fmt: skip
        assert_gist_runs_close(*runs)


@pytest.mark.skipif("gather_across_devices" not in GIST_ARGUMENTS, reason="GIST gathers from 5.1")
@pytest.mark.parametrize("strategy", MATRYOSHKA_STRATEGIES, indirect=True, ids=strategy_id)
def test_matryoshka_over_gathered_gist_matches_sentence_transformers(
    strategy, tiny_bert_dir, guide_model, generator, monkeypatch
):
    """Rank 1 of 3 stubbed in, in row chunks of a few: the documents and the guide's documents
    gathered, the positive at the rank's offset, at every dimension."""
    monkeypatch.setenv(numerics.CHUNK_ENV_VAR, str(1 / 1024))
    as_rank_one_of_three(monkeypatch, st_losses.CachedGISTEmbedLoss, truncatable=True)
    model = make_model(tiny_bert_dir, models.Pooling)
    reps, reps_guided = gist_reps(generator, 3)
    options = {"gather_across_devices": True, "margin": 0.05, "mini_batch_size": 3}
    runs = gist_matryoshka_runs(
        lambda module: module.CachedGISTEmbedLoss(model, guide_model, **options), reps, reps_guided,
        MATRYOSHKA_ARGUMENTS[1], 1,
    )  # fmt: skip
    assert_gist_runs_close(*runs)


HALF_MATRYOSHKA = {"matryoshka_dims": [32, 16, 8, 4], "matryoshka_weights": [1.0, 1.0, 0.5, 0.25]}


def half_matryoshka_grads(recipe, module, columns, loss_scale, model, guide_model, guide_columns):
    """The gradients of the columns (float64, divided by ``loss_scale``) of ``module``'s
    MatryoshkaLoss over hardness-weighted MNRL (``"hardness"``) or of its CachedGISTEmbedLoss's
    loss stage summed over the dimensions (``"gist"``: our drop-in's one-pass call; for
    sentence-transformers, its stage on each truncated, normalized prefix, which is what its
    MatryoshkaLoss computes), the loss times ``loss_scale`` backpropagated."""
    leaves = [column.clone().requires_grad_() for column in columns]
    dims, weights = HALF_MATRYOSHKA["matryoshka_dims"], HALF_MATRYOSHKA["matryoshka_weights"]
    if recipe == "hardness":
        inner = module.MultipleNegativesRankingLoss(
            EmbeddingColumns(32), hardness_mode="all_negatives", hardness_strength=5.0
        )
        loss = module.MatryoshkaLoss(inner.model, inner, **HALF_MATRYOSHKA)
        value = loss([{"embedding": leaf} for leaf in leaves], torch.empty(0))
    else:
        inner = module.CachedGISTEmbedLoss(model, guide_model, temperature=0.05, mini_batch_size=64)
        guide = [[column] for column in guide_columns]
        if module is losses:
            with inner.computing_dims(dims, weights):
                value = inner.calculate_loss([[leaf] for leaf in leaves], guide)
        else:
            shrink = sys.modules[st_losses.MatryoshkaLoss.__module__].shrink
            value = sum(
                weight * inner.calculate_loss([[shrink(leaf, dim)] for leaf in leaves], guide)
                for dim, weight in zip(dims, weights, strict=True)
            )
    (value * loss_scale).backward()
    return [leaf.grad.double() / loss_scale for leaf in leaves]


@pytest.mark.parametrize("recipe", ["hardness", "gist"])
@pytest.mark.parametrize(
    "backend, dtype, loss_scale", HALF_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_matryoshka_over_recipes_half_precision_within_twice_eager(
    recipe, backend, dtype, loss_scale, tiny_bert_dir, guide_model, generator, monkeypatch
):
    """Easy positives, 256 queries (128 under the interpreter) with a hard negative, four weighted
    dimensions: hardness weighting (all negatives, strength 5) and GIST (a guide near the model's
    embeddings) in one pass, flash-attention's rule against sentence-transformers' MatryoshkaLoss
    in the same dtype."""
    if recipe == "hardness" and not HAS_HARDNESS:
        pytest.skip("this sentence-transformers has no hardness_mode (5.3)")
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", backend)
    model = make_model(tiny_bert_dir, models.Pooling)
    batch = 128 if backend == "triton" else 256
    columns = [column.to(dtype) for column in easy_columns(batch, 32, generator)]
    noise = [torch.randn(batch, 24, generator=generator, dtype=torch.float64) for _ in columns]
    guide = [
        (column[:, :24].double() + 0.1 * extra).float() for column, extra in zip(columns, noise, strict=True)
    ]
    run = functools.partial(
        half_matryoshka_grads, recipe, model=model, guide_model=guide_model, guide_columns=guide
    )
    truth = run(st_losses, [column.double() for column in columns], 1.0)
    eager = run(st_losses, columns, loss_scale)
    ours = run(losses, columns, loss_scale)
    names = ("queries", "positives", "negatives")
    what = f"Matryoshka {recipe} {backend} {dtype}"
    assert_within_eager(ours, eager, truth, dtype, loss_scale, what, names)


def test_matryoshka_over_the_recipes_runs_one_pass(tiny_bert_dir, guide_model, generator, monkeypatch):
    """Hardness-weighted MNRL (where the release has it) and both GIST losses inside MatryoshkaLoss:
    one call of the one-pass op for all dimensions, no single-dimension loss."""
    calls = []
    one_pass = similarity.matryoshka_loss_op

    def counted(*args):
        calls.append(args[4])
        return one_pass(*args)

    def refuse(*args, **kwargs):
        raise AssertionError("a single-dimension loss ran inside MatryoshkaLoss")

    monkeypatch.setattr(similarity, "matryoshka_loss_op", counted)
    monkeypatch.setattr(functional, "_contrastive_loss", refuse)
    arguments = MATRYOSHKA_ARGUMENTS[0]
    if HAS_HARDNESS:
        inner = losses.MultipleNegativesRankingLoss(EmbeddingColumns(16), hardness_mode="all_negatives",
                                                    hardness_strength=5.0)  # fmt: skip
        matryoshka_run(losses.MatryoshkaLoss, inner, random_columns(3, generator), arguments, 0)
    model = make_model(tiny_bert_dir, models.Pooling)
    gist = losses.MatryoshkaLoss(model, losses.GISTEmbedLoss(model, guide_model), **arguments)
    gist([tokenize(model, column) for column in GIST_COLUMNS["pairs"]], torch.empty(0)).backward()
    reps, reps_guided = gist_reps(generator, 3)
    inner = losses.CachedGISTEmbedLoss(model, guide_model, mini_batch_size=3)
    cached_matryoshka_run(losses, inner, reps, arguments, 0, reps_guided)
    assert calls == [[3, 8, 16]] * (3 if HAS_HARDNESS else 2)


def st_gist_overwrites_features(model, guide, texts) -> bool:
    """Whether sentence-transformers' GISTEmbedLoss runs the guide on the model's own feature
    dicts (releases before the shallow copies), leaving the guide's embedding where its
    MatryoshkaLoss reads the model's for every dimension after the first."""
    features = [tokenize(model, column) for column in texts]
    with torch.no_grad():
        st_losses.GISTEmbedLoss(model, guide)(features, torch.empty(0))
        guide_embedding = guide(tokenize(guide, texts[0]))["sentence_embedding"]
    left = features[0].get("sentence_embedding")
    return left is not None and torch.equal(left, guide_embedding)


def skip_where_st_gist_overwrites_features(model, guide, texts) -> None:
    """Skips a comparison with sentence-transformers' MatryoshkaLoss over its GISTEmbedLoss on a
    release whose GIST runs the guide on the model's feature dicts (``guide``: another model than
    ``model``, which tells the releases apart)."""
    if st_gist_overwrites_features(model, guide, texts):
        pytest.skip(
            "this sentence-transformers' GISTEmbedLoss writes the guide's embeddings into the "
            "model's features: its MatryoshkaLoss scores the guide's after the first dimension"
        )


MODEL_GIST_CASES = {
    # name: (columns, GISTEmbedLoss options, whether the guide keeps fewer tokens than the model)
    "pairs": ("pairs", {}, False),
    "triplets-margin-no-positive-pairs": ("triplets", {"margin": 0.1, "contrast_positives": False}, False),
    "identical-relative": ("identical", {"margin_strategy": "relative", "margin": 0.05}, False),
    "retokenized": ("triplets", {"contrast_anchors": False}, True),
}


@pytest.mark.parametrize("case", list(MODEL_GIST_CASES))
def test_matryoshka_over_gist_matches_sentence_transformers(case, tiny_bert_dir, guide_model):
    """Through a tiny BERT: the loss and every parameter's gradient of sentence-transformers'
    MatryoshkaLoss over its GISTEmbedLoss, with margins, contrast flags, a hard negative, identical
    texts, and a guide that must retokenize (shorter sequences than the model's)."""
    columns, options, retokenize = MODEL_GIST_CASES[case]
    options = gist_options(options)
    model = make_model(tiny_bert_dir, models.Pooling)
    texts = GIST_COLUMNS[columns]
    skip_where_st_gist_overwrites_features(model, guide_model, texts)
    guide = guide_model
    if retokenize:
        guide = copy.deepcopy(guide_model)
        guide.max_seq_length = model.max_seq_length // 2  # long enough for every sentence here

    def build(module, m, g):
        return module.MatryoshkaLoss(m, module.GISTEmbedLoss(m, g, **options), [32, 16, 4], [1.0, 0.5, 2.0])

    results = []
    for module in (losses, st_losses):
        loss = build(module, model, guide)
        assert not retokenize or loss.loss.must_retokenize
        results.append(gist_parameter_grads(model, loss, texts))
    truth = float64_parameter_grads(lambda m, g: build(st_losses, m, g), model, guide, texts)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert_parameter_grads_close(results[0][1], results[1][1], truth[1])


def test_matryoshka_over_the_model_as_its_own_guide_matches_sentence_transformers(tiny_bert_dir, guide_model):
    """A GIST loss whose guide is the model itself: sentence-transformers' MatryoshkaLoss truncates
    the guide's embeddings too, so the drop-in runs it (fused GIST once per dimension)."""
    model = make_model(tiny_bert_dir, models.Pooling)
    texts = GIST_COLUMNS["pairs"]
    skip_where_st_gist_overwrites_features(model, guide_model, texts)

    def build(module, m):
        return module.MatryoshkaLoss(m, module.GISTEmbedLoss(m, m), [32, 8])

    (value, ours), (expected, theirs) = (gist_parameter_grads(model, build(module, model), texts)
                                         for module in (losses, st_losses))  # fmt: skip
    truth = float64_parameter_grads(lambda m, _: build(st_losses, m), model, None, texts)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    assert_parameter_grads_close(ours, theirs, truth[1])


FLOAT64_INNER_LOSSES = {
    "mnrl": lambda module, model, _: module.MultipleNegativesRankingLoss(model),
    "cached": lambda module, model, _: module.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3),
    "gist": lambda module, model, guide: module.GISTEmbedLoss(model, guide),
    "cached-gist": lambda module, model, guide: module.CachedGISTEmbedLoss(model, guide, mini_batch_size=3),
}


@pytest.mark.parametrize("inner", list(FLOAT64_INNER_LOSSES))
def test_matryoshka_over_a_float64_model_matches_sentence_transformers(inner, tiny_bert_dir, guide_model):
    """float64 embeddings take sentence-transformers' computation inside the fused MatryoshkaLoss
    too (for GIST, its MatryoshkaLoss runs): once per dimension, the same loss and gradients."""
    model = make_model(tiny_bert_dir, models.Pooling).double()
    guide = copy.deepcopy(guide_model).double()
    texts = GIST_COLUMNS["triplets"]
    results = []
    for module in (losses, st_losses):
        loss = module.MatryoshkaLoss(model, FLOAT64_INNER_LOSSES[inner](module, model, guide), [32, 16, 8])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the one fallback warning
            results.append(gist_parameter_grads(model, loss, texts))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for name in results[1][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("inner", ["cached", "cached-gist"])
def test_cached_float64_fallback_computes_every_handed_dimension(
    inner, tiny_bert_dir, guide_model, generator
):
    """float64 mini-batches handed to a cached loss of a float32 model inside MatryoshkaLoss's
    one call: sentence-transformers' loss stage once per dimension, weighted and summed, with one
    backward."""
    model = make_model(tiny_bert_dir, models.Pooling)
    reps, reps_guided = gist_reps(generator, 3)
    reps = [[part.double() for part in column] for column in reps]
    extra = [reps_guided] if inner == "cached-gist" else []
    dims, weights = (16, 5), (1.0, 2.0)
    ours = FLOAT64_INNER_LOSSES[inner](losses, model, guide_model)
    leaves = [[part.clone().requires_grad_() for part in column] for column in reps]
    with warnings.catch_warnings(), ours.computing_dims(dims, weights):
        warnings.simplefilter("ignore", UserWarning)  # the one fallback warning
        value = ours.calculate_loss(leaves, *extra, with_backward=True)
    theirs = FLOAT64_INNER_LOSSES[inner](st_losses, model, guide_model)
    expected_leaves = [[part.clone().requires_grad_() for part in column] for column in reps]
    expected = 0.0
    for dim, weight in zip(dims, weights, strict=True):
        prefixes = [[part[:, :dim] for part in column] for column in expected_leaves]
        expected = expected + weight * theirs.calculate_loss(prefixes, *extra)
    expected.backward()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-10, atol=1e-10)
    for column, expected_column in zip(leaves, expected_leaves, strict=True):
        for part, expected_part in zip(column, expected_column, strict=True):
            torch.testing.assert_close(part.grad, expected_part.grad, rtol=1e-10, atol=1e-12)
