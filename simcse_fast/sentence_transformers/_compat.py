"""The parts of sentence-transformers the drop-ins build on, across its module layouts: 5.4 and
later keep them in ``sentence_transformers.sentence_transformer.{losses,modules}``, older
releases in ``sentence_transformers.{losses,models}``."""

from __future__ import annotations

import importlib

try:
    import sentence_transformers  # noqa: F401
except ImportError as error:
    raise ImportError(
        "simcse_fast.sentence_transformers needs sentence-transformers >= 3.4.1: "
        "pip install sentence-transformers"
    ) from error


def _first_module(*names: str):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {', '.join(names)} could be imported")


st_losses = _first_module("sentence_transformers.sentence_transformer.losses", "sentence_transformers.losses")
st_modules = _first_module(
    "sentence_transformers.sentence_transformer.modules", "sentence_transformers.models"
)
st_util = importlib.import_module("sentence_transformers.util")

cos_sim = st_util.cos_sim


def _embed_each_column(model, sentence_features) -> list:
    """One forward per column (releases before ``embed_columns``)."""
    return [model(features)["sentence_embedding"] for features in sentence_features]


try:
    # 6.0 and later embed homogeneous columns in one forward: the drop-ins embed as the release does.
    from sentence_transformers.base.losses.merged_forward import embed_columns
except ImportError:
    embed_columns = _embed_each_column
