"""sentence-transformers drop-ins: one import swap, the same numbers, fused kernels underneath.

::

    # was: from sentence_transformers import losses, models
    from simcse_fast.sentence_transformers import losses, models
    train_loss = losses.MultipleNegativesRankingLoss(model)        # same arguments, same loss

``losses`` and ``models`` offer every public name of sentence-transformers' ``losses`` and
``models`` (``sentence_transformers.sentence_transformer.losses`` / ``.modules`` where the release
has them), so a script works with only that import changed: ``MultipleNegativesRankingLoss``,
``MultipleNegativesSymmetricRankingLoss``, ``CachedMultipleNegativesRankingLoss`` and ``Pooling``
are the fused drop-ins, everything else (``models.Transformer``, ``losses.MatryoshkaLoss``, ...)
is sentence-transformers' own. ``apply_fused_pooling`` swaps the Pooling modules of an existing
model in place, ``restore_pooling`` undoes it (both here and in ``models``).
Needs sentence-transformers >= 3.4.1 (``pip install sentence-transformers``). Its private
methods are overridden only where their signature is the expected one (checked at import);
elsewhere its own code runs.
"""

from . import losses, models
from .models import apply_fused_pooling, restore_pooling

__all__ = ["apply_fused_pooling", "losses", "models", "restore_pooling"]
