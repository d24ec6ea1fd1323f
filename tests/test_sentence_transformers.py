"""sentence-transformers drop-ins: the same loss and gradients as sentence-transformers' own
classes for every option, Pooling equal to theirs, training with only the import swapped."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

from inputs import SENTENCES, assert_within_eager, cpu_backends  # noqa: E402
from sentence_transformers import InputExample, SentenceTransformer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simcse_fast.sentence_transformers import losses, models  # noqa: E402
from simcse_fast.sentence_transformers._compat import st_losses, st_modules  # noqa: E402


def make_model(folder, pooling_class=st_modules.Pooling, **pooling_kwargs) -> SentenceTransformer:
    transformer = st_modules.Transformer(str(folder))
    pooling = pooling_class(transformer.get_embedding_dimension(), **pooling_kwargs)
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    model.eval()  # dropout off: both losses must see the same embeddings
    return model


def random_columns(n_columns: int, generator, batch=6, dim=16):
    return [torch.randn(batch, dim, generator=generator, dtype=torch.float32) for _ in range(n_columns)]


def loss_and_grads(loss, columns):
    leaves = [c.clone().requires_grad_() for c in columns]
    value = loss.compute_loss_from_embeddings(leaves, None)
    grads = torch.autograd.grad(value, leaves)
    return value, grads


DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]
OPTION_CASES = [
    {"directions": directions, "partition_mode": mode}
    for directions, mode in itertools.product(DIRECTION_SETS, ("joint", "per_direction"))
    if mode == "joint" or not set(directions) & {"query_to_query", "doc_to_doc"}
]


@pytest.mark.parametrize("n_columns", [2, 3, 4], ids=lambda n: f"{n - 2}-hard-negatives")
@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: f"{'+'.join(o['directions'])}-{o['partition_mode']}"
)
def test_mnrl_matches_sentence_transformers(options, n_columns, generator):
    columns = random_columns(n_columns, generator)
    for extra in ({}, {"scale": 7.0}, {"gather_across_devices": True}):
        ours = losses.MultipleNegativesRankingLoss(None, **options, **extra)
        theirs = st_losses.MultipleNegativesRankingLoss(None, **options, **extra)
        value, grads = loss_and_grads(ours, columns)
        expected, expected_grads = loss_and_grads(theirs, columns)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_symmetric_mnrl_matches_sentence_transformers(generator):
    columns = random_columns(2, generator)
    value, grads = loss_and_grads(losses.MultipleNegativesSymmetricRankingLoss(None), columns)
    expected, expected_grads = loss_and_grads(st_losses.MultipleNegativesSymmetricRankingLoss(None), columns)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"similarity_fct": __import__("sentence_transformers").util.dot_score}, "similarity_fct"),
        ({"hardness_mode": "in_batch_negatives", "hardness_strength": 5.0}, "hardness_mode"),
    ],
)
def test_unfusable_options_fall_back_with_one_warning(options, reason, generator):
    columns = random_columns(3, generator)
    ours = losses.MultipleNegativesRankingLoss(None, **options)
    theirs = st_losses.MultipleNegativesRankingLoss(None, **options)
    with pytest.warns(UserWarning, match=reason):
        value, _ = loss_and_grads(ours, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_and_grads(ours, columns)  # no second warning
    torch.testing.assert_close(value, loss_and_grads(theirs, columns)[0])


def parameter_grads(model, loss, columns):
    model.zero_grad()
    loss([model.preprocess(column) for column in columns], torch.empty(0)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "ours_class, theirs_class, kwargs",
    [
        (losses.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss, {}),
        (losses.MultipleNegativesSymmetricRankingLoss, st_losses.MultipleNegativesSymmetricRankingLoss, {}),
        (
            losses.CachedMultipleNegativesRankingLoss,
            st_losses.CachedMultipleNegativesRankingLoss,
            {"mini_batch_size": 3, "directions": ("query_to_doc", "query_to_query")},
        ),
    ],
    ids=["mnrl", "symmetric", "cached"],
)
def test_parameter_gradients_match(tiny_bert_dir, ours_class, theirs_class, kwargs):
    model = make_model(tiny_bert_dir, models.Pooling)
    columns = [SENTENCES, SENTENCES[::-1], SENTENCES[1:] + SENTENCES[:1]]
    ours = parameter_grads(model, ours_class(model, **kwargs), columns)
    theirs = parameter_grads(model, theirs_class(model, **kwargs), columns)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in ours:
        error = (ours[name] - theirs[name]).abs().max().item()
        assert error <= 1e-5 * max(1.0, theirs[name].abs().max().item()), f"{name}: max error {error:.2e}"


POOLING_MODES = ["mean", "max", "cls", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("mean", "max"),
                 ("cls", "max", "mean", "lasttoken")]  # fmt: skip


@pytest.mark.parametrize("mode", POOLING_MODES, ids=str)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_pooling_matches_sentence_transformers(mode, padding, generator):
    hidden = 12
    token_embeddings = torch.randn(5, 9, hidden, generator=generator, requires_grad=True)
    lengths = torch.tensor([9, 4, 1, 7, 0])
    positions = torch.arange(9)
    if padding == "right":
        mask = (positions[None, :] < lengths[:, None]).long()
    else:
        mask = (positions[None, :] >= 9 - lengths[:, None]).long()
    ours = models.Pooling(hidden, pooling_mode=mode)
    theirs = st_modules.Pooling(hidden, pooling_mode=mode)
    out = ours({"token_embeddings": token_embeddings, "attention_mask": mask})["sentence_embedding"]
    expected = theirs({"token_embeddings": token_embeddings, "attention_mask": mask})["sentence_embedding"]
    has_tokens = lengths > 0
    torch.testing.assert_close(out[has_tokens], expected[has_tokens])
    modes = (mode,) if isinstance(mode, str) else mode
    for index, name in enumerate(modes):
        block = slice(index * hidden, (index + 1) * hidden)
        if name == "max":
            # Deliberate difference: an all-padding row max-pools to 0, not -inf.
            assert torch.equal(out[~has_tokens, block], torch.zeros(1, hidden))
        else:
            torch.testing.assert_close(out[~has_tokens, block], expected[~has_tokens, block])
    weights = torch.randn(out.shape, generator=generator)
    (grad,) = torch.autograd.grad((out[has_tokens] * weights[has_tokens]).sum(), token_embeddings)
    (expected_grad,) = torch.autograd.grad(
        (expected[has_tokens] * weights[has_tokens]).sum(), token_embeddings
    )
    torch.testing.assert_close(grad, expected_grad)


def test_pooling_excludes_the_prompt_like_sentence_transformers(generator):
    token_embeddings = torch.randn(3, 8, 10, generator=generator)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0] * 2 + [1] * 6])
    features = {"token_embeddings": token_embeddings, "attention_mask": mask, "prompt_length": 2}
    for mode in ("mean", "max"):
        ours = models.Pooling(10, pooling_mode=mode, include_prompt=False)(dict(features))
        theirs = st_modules.Pooling(10, pooling_mode=mode, include_prompt=False)(dict(features))
        torch.testing.assert_close(ours["sentence_embedding"], theirs["sentence_embedding"])


def test_saved_model_loads_in_sentence_transformers(tiny_bert_dir, tmp_path):
    """The saved folder names sentence-transformers' own Pooling: plain sentence-transformers
    loads it without trust_remote_code, with the same config and embeddings."""
    model = make_model(tiny_bert_dir, models.Pooling, pooling_mode="max")
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)
    model.save(str(tmp_path / "fused"))
    modules_json = (tmp_path / "fused" / "modules.json").read_text()
    assert "simcse_fast" not in modules_json
    reloaded = SentenceTransformer(str(tmp_path / "fused"), device="cpu")
    assert type(reloaded[1]) is st_modules.Pooling and reloaded[1].pooling_mode == "max"
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), embeddings)
    models.apply_fused_pooling(reloaded)
    assert type(reloaded[1]) is models.Pooling
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), embeddings)


def test_apply_fused_pooling_swaps_in_place(tiny_bert_dir):
    model = make_model(tiny_bert_dir, pooling_mode="mean")
    before = model.encode(SENTENCES, convert_to_tensor=True)
    assert models.apply_fused_pooling(model) is model
    assert type(model[1]) is models.Pooling and model[1].pooling_mode == "mean"
    torch.testing.assert_close(model.encode(SENTENCES, convert_to_tensor=True), before)
    models.restore_pooling(model)
    assert type(model[1]) is st_modules.Pooling


def test_simcse_example_trains_with_only_the_import_swapped(tiny_bert_dir):
    """The seed's SimCSE recipe: InputExample(texts=[s, s]), a DataLoader, model.fit."""
    model = make_model(tiny_bert_dir, models.Pooling)
    model.train()
    train_examples = [InputExample(texts=[s, s]) for s in SENTENCES * 2]
    train_dataloader = DataLoader(train_examples, batch_size=4, shuffle=True)
    train_loss = losses.MultipleNegativesRankingLoss(model)
    before = [p.detach().clone() for p in model.parameters()]
    model.fit(
        train_objectives=[(train_dataloader, train_loss)], epochs=1, warmup_steps=0, show_progress_bar=False
    )
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_pooling_and_loss_compile_without_graph_breaks(generator):
    pooling = models.Pooling(16, pooling_mode="mean")
    loss = losses.MultipleNegativesRankingLoss(None, directions=("query_to_doc", "doc_to_query"))
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:, 3:] = 0

    def step(tokens_a, tokens_b):
        a = pooling({"token_embeddings": tokens_a, "attention_mask": mask})["sentence_embedding"]
        b = pooling({"token_embeddings": tokens_b, "attention_mask": mask})["sentence_embedding"]
        return loss.compute_loss_from_embeddings([a, b], None)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    tokens = [torch.randn(8, 5, 16, generator=generator, requires_grad=True) for _ in range(2)]
    expected = step(*tokens)
    torch.testing.assert_close(compiled(*tokens), expected)


def test_trainer_trains_through_the_fused_loss(tiny_bert_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = make_model(tiny_bert_dir, models.Pooling)
    model.train()
    train_dataset = datasets.Dataset.from_dict({"anchor": SENTENCES, "positive": SENTENCES[::-1]})
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    loss = losses.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"))
    before = [p.detach().clone() for p in model.parameters()]
    SentenceTransformerTrainer(model=model, args=arguments, train_dataset=train_dataset, loss=loss).train()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def easy_columns(batch: int, dim: int, generator, n_columns: int = 3):
    """Queries, positives ``query + 0.35 N(0, 1)`` (SimCSE's easy positives) and unrelated hard
    negatives, float64."""
    queries = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    positives = queries + 0.35 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    negatives = [
        torch.randn(batch, dim, generator=generator, dtype=torch.float64) for _ in range(n_columns - 2)
    ]
    return [queries, positives, *negatives]


def scaled_grads(loss, columns, loss_scale):
    leaves = [c.clone().requires_grad_() for c in columns]
    (loss.compute_loss_from_embeddings(leaves, None) * loss_scale).backward()
    return [leaf.grad.double() / loss_scale for leaf in leaves]


PRECISION_CASES = [("torch", torch.bfloat16, 1.0), ("torch", torch.float16, 2.0**14)]
if "triton" in cpu_backends():
    PRECISION_CASES.append(("triton", torch.float16, 2.0**14))


@pytest.mark.parametrize(
    "backend, dtype, loss_scale", PRECISION_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: f"{'+'.join(o['directions'])}-{o['partition_mode']}"
)
def test_mnrl_half_precision_with_easy_positives(options, backend, dtype, loss_scale, generator, monkeypatch):
    """Every direction and partition mode: the drop-in's half-precision gradients meet
    flash-attention's rule against sentence-transformers' own loss in the same dtype."""
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", backend)
    columns = easy_columns(256, 64, generator)
    half = [column.to(dtype) for column in columns]
    truth = scaled_grads(
        st_losses.MultipleNegativesRankingLoss(None, **options), [c.to(dtype).double() for c in columns], 1.0
    )
    eager = scaled_grads(st_losses.MultipleNegativesRankingLoss(None, **options), half, loss_scale)
    ours = scaled_grads(losses.MultipleNegativesRankingLoss(None, **options), half, loss_scale)
    names = ("queries", "positives", "negatives")
    assert_within_eager(ours, eager, truth, dtype, loss_scale, f"{backend} {dtype} {options}", names)


@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: f"{'+'.join(o['directions'])}-{o['partition_mode']}"
)
def test_gathered_negatives_match_sentence_transformers(options, generator, monkeypatch):
    """Rank 1 of 3 with the other ranks' embeddings stubbed in (a deterministic function of the
    local ones, no gradient): loss and local gradients equal sentence-transformers'."""
    import sys

    from simcse_fast.sentence_transformers import losses as our_module

    their_module = sys.modules[st_losses.MultipleNegativesRankingLoss.__module__]

    def all_gather_with_grad(x):
        others = [torch.flip(x.detach(), dims=[0]) * (rank + 0.5) + rank for rank in (0, 2)]
        return torch.cat([others[0], x, others[1]])

    for module in (our_module, their_module):
        monkeypatch.setattr(module, "all_gather_with_grad", all_gather_with_grad)
        monkeypatch.setattr(module, "get_rank", lambda: 1)
    columns = random_columns(3, generator)
    ours = losses.MultipleNegativesRankingLoss(None, gather_across_devices=True, **options)
    theirs = st_losses.MultipleNegativesRankingLoss(None, gather_across_devices=True, **options)
    value, grads = loss_and_grads(ours, columns)
    expected, expected_grads = loss_and_grads(theirs, columns)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_a_parameter_scale_keeps_its_gradient(generator):
    """A learnable scale (an nn.Parameter set as ``loss.scale``) gets the gradient
    sentence-transformers gives it; ``float(scale)`` would silently detach it."""
    columns = random_columns(3, generator)
    grads = []
    for loss_class in (losses.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss):
        loss = loss_class(None)
        loss.scale = torch.nn.Parameter(torch.tensor(12.0))
        (grad,) = torch.autograd.grad(loss.compute_loss_from_embeddings(columns, None), loss.scale)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ours_class, theirs_class, kwargs",
    [
        (losses.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss, {}),
        (
            losses.CachedMultipleNegativesRankingLoss,
            st_losses.CachedMultipleNegativesRankingLoss,
            {"mini_batch_size": 3},
        ),
    ],
    ids=["mnrl", "cached"],
)
def test_matryoshka_wraps_the_fused_losses(tiny_bert_dir, ours_class, theirs_class, kwargs):
    """sentence-transformers' MatryoshkaLoss over the fused loss: the same loss and parameter
    gradients as over sentence-transformers' own."""
    model = make_model(tiny_bert_dir, models.Pooling)
    columns = [SENTENCES, SENTENCES[::-1], SENTENCES[1:] + SENTENCES[:1]]
    results = []
    for loss_class in (ours_class, theirs_class):
        loss = st_losses.MatryoshkaLoss(model, loss_class(model, **kwargs), matryoshka_dims=[32, 16, 8])
        model.zero_grad()
        value = loss([model.preprocess(column) for column in columns], torch.empty(0))
        value.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    (ours_value, ours_grads), (theirs_value, theirs_grads) = results
    torch.testing.assert_close(ours_value, theirs_value, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 10
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-4, atol=1e-5, msg=name)
