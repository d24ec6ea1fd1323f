"""sentence-transformers drop-ins: one import swap, the same numbers, fused kernels underneath.

::

    # was: from sentence_transformers import losses, models
    from simcse_fast.sentence_transformers import losses, models
    train_loss = losses.MultipleNegativesRankingLoss(model)        # same arguments, same loss

``losses`` holds ``MultipleNegativesRankingLoss``, ``MultipleNegativesSymmetricRankingLoss`` and
``CachedMultipleNegativesRankingLoss``; ``models`` holds ``Pooling`` and ``apply_fused_pooling``
(swap the Pooling modules of an existing model in place) with its inverse ``restore_pooling``.
Needs sentence-transformers >= 3.4.1 (``pip install sentence-transformers``). Its private
methods are overridden only where their signature is the expected one (checked at import);
elsewhere its own code runs.
"""

from . import losses, models

__all__ = ["losses", "models"]
