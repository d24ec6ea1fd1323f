"""sentence-transformers drop-ins: the same loss and gradients as sentence-transformers' own
classes for every option, Pooling equal to theirs, training with only the import swapped."""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import pydoc
import sys
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

import readme  # noqa: E402
from inputs import SENTENCES, assert_within_eager, cpu_backends  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from simcse_fast.sentence_transformers import losses, models  # noqa: E402
from simcse_fast.sentence_transformers._compat import st_losses, st_modules  # noqa: E402


def make_model(folder, pooling_class=st_modules.Pooling, **pooling_kwargs) -> SentenceTransformer:
    transformer = st_modules.Transformer(str(folder))
    # get_word_embedding_dimension before 5.4
    dimension = (
        getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    )
    pooling = pooling_class(dimension(), **pooling_kwargs)
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    model.eval()  # dropout off: both losses must see the same embeddings
    return model


class EmbeddingColumns(torch.nn.Module):
    """A stand-in model whose features are the sentence embeddings themselves: the losses'
    forward runs on embedding columns in releases without ``compute_loss_from_embeddings``
    (before 5.0; before 5.3 for the symmetric loss)."""

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": features["embedding"]}


COLUMNS = EmbeddingColumns()
MNRL_ARGUMENTS = inspect.signature(st_losses.MultipleNegativesRankingLoss.__init__).parameters
DEFAULT_OPTIONS = {"directions": ("query_to_doc",), "partition_mode": "joint"}
# Both directions where the release has them (5.3 and later), its one direction before.
BOTH_DIRECTIONS = {"directions": ("query_to_doc", "doc_to_query")} if "directions" in MNRL_ARGUMENTS else {}


def release_options(options: dict, loss_class=st_losses.MultipleNegativesRankingLoss) -> dict:
    """``options`` for the installed release's ``loss_class``: an argument it lacks is dropped
    where it asks for the behaviour the release has anyway (one query-to-document softmax);
    otherwise the test is skipped, naming the argument."""
    accepted = inspect.signature(loss_class.__init__).parameters
    missing = [name for name in options if name not in accepted]
    unsupported = [
        name
        for name in missing
        if name not in DEFAULT_OPTIONS
        or (tuple(options[name]) if name == "directions" else options[name]) != DEFAULT_OPTIONS[name]
    ]
    if unsupported:
        pytest.skip(
            f"this sentence-transformers' {loss_class.__name__} has no argument {', '.join(unsupported)}"
        )
    return {name: value for name, value in options.items() if name not in missing}


def loss_value(loss, columns: list[torch.Tensor]) -> torch.Tensor:
    """The loss of embedding columns (the loss was built with ``COLUMNS`` as its model)."""
    if hasattr(getattr(st_losses, type(loss).__name__), "compute_loss_from_embeddings"):
        return loss.compute_loss_from_embeddings(columns, None)
    return loss([{"embedding": column} for column in columns], torch.empty(0))


def tokenize(model, texts):
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)  # tokenize before 5.0


def random_columns(n_columns: int, generator, batch=6, dim=16):
    return [torch.randn(batch, dim, generator=generator, dtype=torch.float32) for _ in range(n_columns)]


def loss_and_grads(loss, columns):
    leaves = [c.clone().requires_grad_() for c in columns]
    value = loss_value(loss, leaves)
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
    options = release_options(options)
    extras = [{}, {"scale": 7.0}]
    if "gather_across_devices" in MNRL_ARGUMENTS:
        extras.append({"gather_across_devices": True})  # 5.1 and later
    for extra in extras:
        ours = losses.MultipleNegativesRankingLoss(COLUMNS, **options, **extra)
        theirs = st_losses.MultipleNegativesRankingLoss(COLUMNS, **options, **extra)
        value, grads = loss_and_grads(ours, columns)
        expected, expected_grads = loss_and_grads(theirs, columns)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_symmetric_mnrl_matches_sentence_transformers(generator):
    columns = random_columns(2, generator)
    value, grads = loss_and_grads(losses.MultipleNegativesSymmetricRankingLoss(COLUMNS), columns)
    expected, expected_grads = loss_and_grads(
        st_losses.MultipleNegativesSymmetricRankingLoss(COLUMNS), columns
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_loss_stays_fp32_under_autocast(generator):
    """Deliberate difference (README): under autocast the fused loss is fp32, where
    sentence-transformers' is in the autocast dtype."""
    columns = [column.bfloat16() for column in random_columns(2, generator)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_value(losses.MultipleNegativesRankingLoss(COLUMNS), columns).dtype == torch.float32


@pytest.mark.parametrize(
    "options, reason",
    [({"similarity_fct": __import__("sentence_transformers").util.dot_score}, "similarity_fct")],
)
def test_unfusable_options_fall_back_with_one_warning(options, reason, generator):
    columns = random_columns(3, generator)
    options = release_options(options)
    ours = losses.MultipleNegativesRankingLoss(COLUMNS, **options)
    theirs = st_losses.MultipleNegativesRankingLoss(COLUMNS, **options)
    with pytest.warns(UserWarning, match=reason):
        value, _ = loss_and_grads(ours, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_and_grads(ours, columns)  # no second warning
    torch.testing.assert_close(value, loss_and_grads(theirs, columns)[0])


FUSED_NAMES = {
    "models": ("Pooling",),
    "losses": (
        "MultipleNegativesRankingLoss",
        "MultipleNegativesSymmetricRankingLoss",
        "CachedMultipleNegativesRankingLoss",
        "GISTEmbedLoss",
        "CachedGISTEmbedLoss",
        "MatryoshkaLoss",
    ),
}
THEIR_PATHS = {
    "models": ("sentence_transformers.models", "sentence_transformers.sentence_transformer.modules"),
    "losses": ("sentence_transformers.losses", "sentence_transformers.sentence_transformer.losses"),
}


def their_modules(kind: str) -> list:
    """sentence-transformers' modules of ``kind`` on this release: the classic path and, from
    5.4, the new one (the classic one then warns that it moved)."""
    found = []
    for path in THEIR_PATHS[kind]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                found.append(importlib.import_module(path))
            except ImportError:
                continue
    return found


@pytest.mark.parametrize("kind", ["models", "losses"])
def test_the_drop_in_modules_offer_every_name_of_sentence_transformers(kind):
    """Issue 19, item 1: ``models.Transformer`` was missing, so the import swap broke the first
    line of sentence-transformers' own example. Every public name of their module is ours too,
    the same object except the fused drop-ins, which subclass theirs; ``dir``, ``import *`` and
    ``help`` see them all."""
    ours = {"models": models, "losses": losses}[kind]
    theirs_list = their_modules(kind)
    assert theirs_list
    for theirs in theirs_list:
        exported = set(getattr(theirs, "__all__", ()))
        names = {name for name in dir(theirs) if not name.startswith("_")} | exported
        assert exported <= set(ours.__all__)
        assert names <= set(dir(ours)), sorted(names - set(dir(ours)))
        for name in names:
            mine, original = getattr(ours, name), getattr(theirs, name)
            if name in FUSED_NAMES[kind]:
                assert mine is not original and issubclass(mine, original), name
            else:
                assert mine is original, name
    namespace = {}
    exec(f"from {ours.__name__} import *", namespace)
    for name in theirs_list[0].__all__:
        assert namespace[name] is getattr(ours, name), name
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        ours.NoSuchThing  # noqa: B018
    text = pydoc.plain(pydoc.render_doc(ours))
    assert all(f"class {name}" in text for name in FUSED_NAMES[kind])
    assert "fused" in text and ("class Transformer" in text or "class MatryoshkaLoss" in text)


def test_fused_pooling_says_so_in_its_repr(tiny_bert_dir):
    """Issue 19, item 11: ``print(model)`` looked the same before and after
    ``apply_fused_pooling``, which the package exports beside ``losses`` and ``models``."""
    from simcse_fast.sentence_transformers import apply_fused_pooling, restore_pooling

    model = make_model(tiny_bert_dir, **pooling_kwargs(("mean", "cls")))
    assert "simcse_fast" not in str(model)
    assert apply_fused_pooling(model) is model
    assert "[simcse_fast: mean fused]" in str(model)
    restore_pooling(model)
    assert "simcse_fast" not in str(model)
    assert "no fused mode here" in repr(models.Pooling(8, **pooling_kwargs("cls")))


@pytest.mark.parametrize(
    "ours_class, theirs_class",
    [
        (losses.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss),
        (losses.MultipleNegativesSymmetricRankingLoss, st_losses.MultipleNegativesSymmetricRankingLoss),
    ],
    ids=["mnrl", "symmetric"],
)
def test_float64_embeddings_run_sentence_transformers_loss(ours_class, theirs_class, generator):
    """Issue 19, item 16: float64 embeddings (``model.double()``) were refused; they take
    sentence-transformers' own computation, after one warning that names the reason."""
    columns = [column.double() for column in random_columns(3, generator)]
    ours = ours_class(COLUMNS)
    with pytest.warns(UserWarning, match="float64 embeddings"):
        value, grads = loss_and_grads(ours, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_and_grads(ours, columns)  # no second warning
    expected, expected_grads = loss_and_grads(theirs_class(COLUMNS), columns)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_a_float64_model_trains_with_the_cached_loss(tiny_bert_dir):
    """``model.double()`` under the cached loss: sentence-transformers' own gradients."""
    model = make_model(tiny_bert_dir, models.Pooling).double()
    columns = [SENTENCES, SENTENCES[::-1]]
    with pytest.warns(UserWarning, match="float64 embeddings"):
        ours_loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
        ours = parameter_grads(model, ours_loss, columns)
    theirs_loss = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    theirs = parameter_grads(model, theirs_loss, columns)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in ours:
        assert ours[name].dtype == torch.float64
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12, msg=name)


def parameter_grads(model, loss, columns):
    model.zero_grad()
    loss([tokenize(model, column) for column in columns], torch.empty(0)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "ours_class, theirs_class, kwargs",
    [
        (losses.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss, {}),
        (losses.MultipleNegativesSymmetricRankingLoss, st_losses.MultipleNegativesSymmetricRankingLoss, {}),
        (
            losses.CachedMultipleNegativesRankingLoss,
            st_losses.CachedMultipleNegativesRankingLoss,
            {"mini_batch_size": 3},
        ),
        (
            losses.CachedMultipleNegativesRankingLoss,
            st_losses.CachedMultipleNegativesRankingLoss,
            {"mini_batch_size": 3, "directions": ("query_to_doc", "query_to_query")},
        ),
    ],
    ids=["mnrl", "symmetric", "cached", "cached-query_to_query"],
)
def test_parameter_gradients_match(tiny_bert_dir, ours_class, theirs_class, kwargs):
    kwargs = release_options(kwargs, theirs_class)
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
# Releases before 5.4 take one boolean per mode and concatenate in this fixed order.
LEGACY_MODE_FLAGS = {
    "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken",
}  # fmt: skip
LEGACY_POOLING = "pooling_mode_mean_tokens" in inspect.signature(st_modules.Pooling.__init__).parameters


def pooling_kwargs(mode) -> dict:
    """Constructor arguments selecting ``mode`` (a name or a tuple of names) in the installed release."""
    if not LEGACY_POOLING:
        return {"pooling_mode": mode}
    modes = (mode,) if isinstance(mode, str) else mode
    return {flag: name in modes for name, flag in LEGACY_MODE_FLAGS.items()}


def output_modes(mode) -> tuple[str, ...]:
    """The modes in the order their vectors are concatenated."""
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    return tuple(name for name in LEGACY_MODE_FLAGS if name in modes) if LEGACY_POOLING else modes


def pool_both(mode, features: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence embeddings of the fused and of sentence-transformers' Pooling. Each gets its own
    copies of the features' tensors: releases before 5.4 write into the token embeddings (max)
    and the mask (prompt exclusion) in place."""

    def copied():
        return {key: value.clone() if torch.is_tensor(value) else value for key, value in features.items()}

    hidden = features["token_embeddings"].shape[-1]
    ours = models.Pooling(hidden, **pooling_kwargs(mode), **kwargs)(copied())["sentence_embedding"]
    theirs = st_modules.Pooling(hidden, **pooling_kwargs(mode), **kwargs)(copied())["sentence_embedding"]
    return ours, theirs


def padded_mask(lengths: torch.Tensor, width: int, padding: str = "right") -> torch.Tensor:
    positions = torch.arange(width)
    if padding == "right":
        return (positions[None, :] < lengths[:, None]).long()
    return (positions[None, :] >= width - lengths[:, None]).long()


@pytest.mark.parametrize("mode", POOLING_MODES, ids=str)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_pooling_matches_sentence_transformers(mode, padding, generator):
    hidden = 12
    token_embeddings = torch.randn(5, 9, hidden, generator=generator, requires_grad=True)
    lengths = torch.tensor([9, 4, 1, 7, 0])
    mask = padded_mask(lengths, 9, padding)
    out, expected = pool_both(mode, {"token_embeddings": token_embeddings, "attention_mask": mask})
    compared = torch.ones(out.shape, dtype=torch.bool)
    modes = output_modes(mode)
    for index, name in enumerate(modes):
        block = slice(index * hidden, (index + 1) * hidden)
        if name == "max":
            # Deliberate difference: an all-padding row max-pools to 0, not -inf.
            assert torch.equal(out[lengths == 0, block], torch.zeros(1, hidden))
            compared[lengths == 0, block] = False
        if name == "cls" and "max" in modes and LEGACY_POOLING:
            # Deliberate difference: releases before 5.4 overwrite padded token embeddings with
            # -1e9 for max, in place, before cls reads position 0 (padding where it is masked).
            compared[mask[:, 0] == 0, block] = False
    torch.testing.assert_close(out[compared], expected[compared])
    weights = torch.randn(out.shape, generator=generator) * compared
    grads = [
        torch.autograd.grad((vectors * weights).sum(), token_embeddings)[0] for vectors in (out, expected)
    ]
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("mode", ["mean", "max", ("mean", "max", "mean_sqrt_len_tokens")], ids=str)
def test_soft_mask_pools_like_sentence_transformers(mode, generator):
    """A floating mask with values between 0 and 1: sentence-transformers' mean is weighted by
    it (so is ours, through its code), its max takes every non-zero position (so does ours)."""
    hidden = 8
    token_embeddings = torch.randn(4, 6, hidden, generator=generator, requires_grad=True)
    mask = torch.rand(4, 6, generator=generator) * padded_mask(torch.tensor([6, 3, 1, 5]), 6)
    mask[0, 2] = 1.0
    out, expected = pool_both(mode, {"token_embeddings": token_embeddings, "attention_mask": mask})
    torch.testing.assert_close(out, expected)
    weights = torch.randn(out.shape, generator=generator)
    grads = [
        torch.autograd.grad((vectors * weights).sum(), token_embeddings)[0] for vectors in (out, expected)
    ]
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_pooling_excludes_the_prompt_like_sentence_transformers(padding, generator):
    token_embeddings = torch.randn(3, 8, 10, generator=generator)
    mask = padded_mask(torch.tensor([8, 5, 6]), 8, padding)
    features = {"token_embeddings": token_embeddings, "attention_mask": mask, "prompt_length": 2}
    for mode in ("mean", "max", ("mean", "max", "weightedmean")):
        ours, theirs = pool_both(mode, features, include_prompt=False)
        torch.testing.assert_close(ours, theirs)


def test_saved_model_loads_in_sentence_transformers(tiny_bert_dir, tmp_path):
    """The saved folder names sentence-transformers' own Pooling: plain sentence-transformers
    loads it without trust_remote_code, with the same config and embeddings."""
    model = make_model(tiny_bert_dir, models.Pooling, **pooling_kwargs("max"))
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)
    model.save(str(tmp_path / "fused"))
    modules_json = (tmp_path / "fused" / "modules.json").read_text()
    assert "simcse_fast" not in modules_json
    reloaded = SentenceTransformer(str(tmp_path / "fused"), device="cpu")
    assert type(reloaded[1]) is st_modules.Pooling
    assert reloaded[1].get_config_dict() == model[1].get_config_dict()
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), embeddings)
    models.apply_fused_pooling(reloaded)
    assert type(reloaded[1]) is models.Pooling
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), embeddings)


def test_apply_fused_pooling_swaps_in_place(tiny_bert_dir):
    model = make_model(tiny_bert_dir, **pooling_kwargs("mean"))
    pooling = model[1]
    before = model.encode(SENTENCES, convert_to_tensor=True)
    assert models.apply_fused_pooling(model) is model
    assert model[1] is pooling and type(pooling) is models.Pooling
    assert pooling.get_config_dict() == st_modules.Pooling(32, **pooling_kwargs("mean")).get_config_dict()
    torch.testing.assert_close(model.encode(SENTENCES, convert_to_tensor=True), before)
    models.restore_pooling(model)
    assert model[1] is pooling and type(pooling) is st_modules.Pooling


def test_pickling_gives_sentence_transformers_pooling(tiny_bert_dir, tmp_path):
    """torch.save of a whole model (and any pickling) rebuilds sentence-transformers' own Pooling
    with the same state; copies keep the fused class."""
    model = make_model(tiny_bert_dir, models.Pooling, **pooling_kwargs(("mean", "max")))
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded[1]) is st_modules.Pooling and type(model[1]) is models.Pooling
    assert loaded[1].get_config_dict() == model[1].get_config_dict()
    torch.testing.assert_close(loaded.encode(SENTENCES, convert_to_tensor=True), expected)
    for clone in (copy.copy(model[1]), copy.deepcopy(model)[1]):
        assert type(clone) is models.Pooling and clone.get_config_dict() == model[1].get_config_dict()


def test_multi_process_encode_matches_single_process(tiny_bert_dir):
    """Two CPU workers get the model by pickling (sentence-transformers' Pooling there): the same
    embeddings as encoding in this process with the fused Pooling."""
    model = make_model(tiny_bert_dir, models.Pooling, **pooling_kwargs(("mean", "max")))
    expected = model.encode(SENTENCES, batch_size=2)
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        if "pool" in inspect.signature(model.encode).parameters:
            embeddings = model.encode(SENTENCES, batch_size=2, pool=pool, chunk_size=2)
        else:  # releases before 5.0
            embeddings = model.encode_multi_process(SENTENCES, pool, batch_size=2, chunk_size=2)
    finally:
        model.stop_multi_process_pool(pool)
    assert type(model[1]) is models.Pooling
    torch.testing.assert_close(torch.as_tensor(embeddings), torch.as_tensor(expected))


@pytest.mark.skipif(
    not hasattr(st_modules, "Router"), reason="sentence-transformers < 5.0 has no Router module"
)
def test_apply_fused_pooling_reaches_poolings_inside_a_router(tiny_bert_dir, tmp_path):
    transformer = st_modules.Transformer(str(tiny_bert_dir))
    router = st_modules.Router.for_query_document(
        query_modules=[transformer, st_modules.Pooling(32, **pooling_kwargs("max"))],
        document_modules=[transformer, st_modules.Pooling(32, **pooling_kwargs("mean"))],
    )
    model = SentenceTransformer(modules=[router], device="cpu")
    model.eval()
    queries, documents = model.encode_query(SENTENCES), model.encode_document(SENTENCES)
    poolings = [module for module in model.modules() if isinstance(module, st_modules.Pooling)]
    assert len(poolings) == 2
    models.apply_fused_pooling(model)
    assert all(type(module) is models.Pooling for module in poolings)
    torch.testing.assert_close(torch.as_tensor(model.encode_query(SENTENCES)), torch.as_tensor(queries))
    torch.testing.assert_close(torch.as_tensor(model.encode_document(SENTENCES)), torch.as_tensor(documents))
    model.save(str(tmp_path / "router"))  # the routes name sentence-transformers' Pooling too
    reloaded = SentenceTransformer(str(tmp_path / "router"), device="cpu")
    reloaded_poolings = [module for module in reloaded.modules() if isinstance(module, st_modules.Pooling)]
    assert len(reloaded_poolings) == 2 and all(type(m) is st_modules.Pooling for m in reloaded_poolings)
    torch.testing.assert_close(torch.as_tensor(reloaded.encode_query(SENTENCES)), torch.as_tensor(queries))
    models.restore_pooling(model)
    assert all(type(module) is st_modules.Pooling for module in poolings)


needs_flattened = pytest.mark.skipif(
    not hasattr(st_modules.Pooling, "_forward_flattened"),
    reason="sentence-transformers < 5.4 has no flattened (cu_seq_lens_q) Pooling path",
)


def packed_features(lengths: list[int], hidden: int, generator) -> dict:
    """A flattened batch as sentence-transformers' Pooling gets it from FA2 unpadding."""
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    tokens = torch.randn(1, sum(lengths), hidden, generator=generator, requires_grad=True)
    return {"token_embeddings": tokens, "cu_seq_lens_q": offsets}


@needs_flattened
@pytest.mark.parametrize(
    "mode", ["mean", "max", ("cls", "max", "mean", "lasttoken", "weightedmean")], ids=str
)
@pytest.mark.parametrize("prompt_length", [None, 2])
def test_packed_pooling_matches_sentence_transformers(mode, prompt_length, generator):
    """The flattened path (features with cu_seq_lens_q): values and gradients equal
    sentence-transformers' _forward_flattened; an empty sequence max-pools to 0."""
    lengths = [4, 3, 7, 5] if prompt_length else [4, 0, 7, 1, 5]
    features = packed_features(lengths, 6, generator)
    if prompt_length:
        features["prompt_length"] = prompt_length
    include_prompt = prompt_length is None
    ours = models.Pooling(6, **pooling_kwargs(mode), include_prompt=include_prompt)(dict(features))
    theirs = st_modules.Pooling(6, **pooling_kwargs(mode), include_prompt=include_prompt)(dict(features))
    out, expected = ours["sentence_embedding"], theirs["sentence_embedding"]
    has_tokens = torch.tensor(lengths) > 0
    torch.testing.assert_close(out[has_tokens], expected[has_tokens])
    for index, name in enumerate(output_modes(mode)):
        block = slice(index * 6, (index + 1) * 6)
        if name == "max":
            assert torch.equal(out[~has_tokens, block], torch.zeros(int((~has_tokens).sum()), 6))
        else:
            torch.testing.assert_close(out[~has_tokens, block], expected[~has_tokens, block])
    weights = torch.randn(out.shape, generator=generator) * has_tokens[:, None]
    tokens = features["token_embeddings"]
    grads = [torch.autograd.grad((vectors * weights).sum(), tokens)[0] for vectors in (out, expected)]
    torch.testing.assert_close(grads[0], grads[1])


@needs_flattened
def test_packed_prompt_exclusion_equals_the_padded_path(generator):
    """Each sequence loses its own first prompt_length tokens, a sequence no longer than the
    prompt is empty (sentence-transformers 6.2's rule): packed and padded agree."""
    lengths = [5, 2, 0, 6, 3]
    features = packed_features(lengths, 4, generator)
    padded = torch.zeros(len(lengths), max(lengths), 4)
    for row, (start, length) in enumerate(zip(features["cu_seq_lens_q"][:-1].tolist(), lengths, strict=True)):
        padded[row, :length] = features["token_embeddings"][0, start : start + length].detach()
    mask = padded_mask(torch.tensor(lengths), max(lengths))
    pooling = models.Pooling(4, **pooling_kwargs(("mean", "max")), include_prompt=False)
    packed = pooling({**features, "prompt_length": 3})["sentence_embedding"]
    expected = pooling({"token_embeddings": padded, "attention_mask": mask, "prompt_length": 3})
    torch.testing.assert_close(packed, expected["sentence_embedding"])
    assert torch.equal(packed[[1, 2]], torch.zeros(2, 8))


def _trainer_takes_transformers_arguments() -> bool:
    from sentence_transformers import SentenceTransformerTrainer

    theirs = inspect.signature(SentenceTransformerTrainer.compute_loss).parameters
    passed = inspect.signature(transformers.Trainer.compute_loss).parameters
    return "num_items_in_batch" in theirs or "num_items_in_batch" not in passed


needs_compatible_trainer = pytest.mark.skipif(
    not _trainer_takes_transformers_arguments(),
    reason="this sentence-transformers' SentenceTransformerTrainer.compute_loss has no num_items_in_batch, "
    "which this transformers' Trainer passes (sentence-transformers < 3.3 with transformers >= 4.46)",
)


@needs_compatible_trainer
def test_the_readme_example_trains_with_only_the_import_swapped(tiny_bert_dir, tmp_path, monkeypatch):
    """Issue 19, item 1: the README's quick start, sentence-transformers' classic training script
    with its import swapped, run as written (the tiny BERT in place of the hub model)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentences.txt").write_text("".join(f"{s} {i}\n" for i in range(32) for s in SENTENCES))
    namespace = readme.run_python("import-swap", {'"distilroberta-base"': f'"{tiny_bert_dir}"'})
    model = namespace["model"]
    assert type(model[1]) is models.Pooling
    assert type(namespace["train_loss"]) is losses.MultipleNegativesRankingLoss
    start = transformers.AutoModel.from_pretrained(str(tiny_bert_dir))
    trained = model[0].auto_model
    changed = [not torch.equal(a, b) for a, b in zip(start.parameters(), trained.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
    reloaded = SentenceTransformer(str(tmp_path / "simcse-st-model"), device="cpu")
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), expected)


def test_the_readme_fuses_an_existing_model(tiny_bert_dir, tmp_path, capsys):
    """The README's apply_fused_pooling block on a saved model (the hub name replaced)."""
    make_model(tiny_bert_dir).save(str(tmp_path / "st-model"))
    replacements = {'"sentence-transformers/all-MiniLM-L6-v2"': f'"{tmp_path / "st-model"}"'}
    namespace = readme.run_python("apply-fused-pooling", replacements)
    assert "[simcse_fast: mean fused]" in capsys.readouterr().out
    assert type(namespace["model"][1]) is st_modules.Pooling  # restored


def test_pooling_and_loss_compile_without_graph_breaks(generator):
    pooling = models.Pooling(16, **pooling_kwargs("mean"))
    loss = losses.MultipleNegativesRankingLoss(None, **BOTH_DIRECTIONS)
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


@needs_compatible_trainer
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
    loss = losses.MultipleNegativesRankingLoss(model, **BOTH_DIRECTIONS)
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
    (loss_value(loss, leaves) * loss_scale).backward()
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
    options = release_options(options)
    columns = easy_columns(256, 64, generator)
    half = [column.to(dtype) for column in columns]
    truth = scaled_grads(
        st_losses.MultipleNegativesRankingLoss(COLUMNS, **options),
        [c.to(dtype).double() for c in columns],
        1.0,
    )
    eager = scaled_grads(st_losses.MultipleNegativesRankingLoss(COLUMNS, **options), half, loss_scale)
    ours = scaled_grads(losses.MultipleNegativesRankingLoss(COLUMNS, **options), half, loss_scale)
    names = ("queries", "positives", "negatives")
    assert_within_eager(ours, eager, truth, dtype, loss_scale, f"{backend} {dtype} {options}", names)


@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: f"{'+'.join(o['directions'])}-{o['partition_mode']}"
)
def test_gathered_negatives_match_sentence_transformers(options, generator, monkeypatch):
    """Rank 1 of 3 with the other ranks' embeddings stubbed in (a deterministic function of the
    local ones, no gradient): loss and local gradients equal sentence-transformers'."""
    from simcse_fast.sentence_transformers import losses as our_module

    options = release_options({**options, "gather_across_devices": True})
    their_module = sys.modules[st_losses.MultipleNegativesRankingLoss.__module__]

    def all_gather_with_grad(x):
        others = [torch.flip(x.detach(), dims=[0]) * (rank + 0.5) + rank for rank in (0, 2)]
        return torch.cat([others[0], x, others[1]])

    for module in (our_module, their_module):
        monkeypatch.setattr(module, "all_gather_with_grad", all_gather_with_grad)
    monkeypatch.setattr(our_module, "get_rank", lambda: 1)
    if hasattr(their_module, "get_rank"):
        monkeypatch.setattr(their_module, "get_rank", lambda: 1)
    else:  # before 6.0 the rank comes from torch.distributed, behind an initialized check
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        if hasattr(their_module, "is_dist_initialized"):
            monkeypatch.setattr(their_module, "is_dist_initialized", lambda: True)
    columns = random_columns(3, generator)
    ours = losses.MultipleNegativesRankingLoss(COLUMNS, **options)
    theirs = st_losses.MultipleNegativesRankingLoss(COLUMNS, **options)
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
        loss = loss_class(COLUMNS)
        loss.scale = torch.nn.Parameter(torch.tensor(12.0))
        (grad,) = torch.autograd.grad(loss_value(loss, columns), loss.scale)
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
    matryoshka_module = sys.modules[st_losses.MatryoshkaLoss.__module__]
    if ours_class is losses.CachedMultipleNegativesRankingLoss and not hasattr(
        matryoshka_module, "CachedLossDecorator"
    ):
        pytest.skip(
            "this sentence-transformers' MatryoshkaLoss has no CachedLossDecorator (cached losses: 3.4)"
        )
    model = make_model(tiny_bert_dir, models.Pooling)
    columns = [SENTENCES, SENTENCES[::-1], SENTENCES[1:] + SENTENCES[:1]]
    results = []
    for loss_class in (ours_class, theirs_class):
        loss = st_losses.MatryoshkaLoss(model, loss_class(model, **kwargs), matryoshka_dims=[32, 16, 8])
        model.zero_grad()
        value = loss([tokenize(model, column) for column in columns], torch.empty(0))
        value.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    (ours_value, ours_grads), (theirs_value, theirs_grads) = results
    torch.testing.assert_close(ours_value, theirs_value, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 10
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-4, atol=1e-5, msg=name)
