"""Drop-in replacement for sentence-transformers' ``Pooling`` with fused mean and max pooling.

``Pooling`` takes the same constructor arguments and config (all modes, ``include_prompt``,
save/load) as sentence-transformers' module; ``mean`` and ``max`` run on
``simcse_fast.masked_mean_pool`` / ``masked_max_pool``, every other mode on
sentence-transformers' own code. One deliberate difference: a row with no token left (all
padding, or only prompt tokens with ``include_prompt=False``) max-pools to zeros, where
sentence-transformers gives ``-inf``.

Saving: a ``SentenceTransformer`` records each module's class by its import path, and
sentence-transformers refuses to import classes from other packages unless told to trust remote
code. The fused ``Pooling`` therefore presents itself under sentence-transformers' own path
(its ``__module__``): a saved model names sentence-transformers' ``Pooling``, with the same
config, and loads in plain sentence-transformers, simcse_fast installed or not. Call
``apply_fused_pooling`` after loading to get the fused kernels again. (Pickling a fused
``Pooling`` object likewise restores sentence-transformers' class: same results, unfused.)

``apply_fused_pooling(model)`` swaps the Pooling modules of an existing ``SentenceTransformer``
in place (the Liger-Kernel ``apply`` convention); ``restore_pooling(model)`` swaps them back.
"""

from __future__ import annotations

import copy
import warnings

from torch import Tensor

from .. import functional
from ._compat import st_modules

__all__ = ["Pooling", "apply_fused_pooling", "restore_pooling"]

FUSED_MODES = {"mean": functional.masked_mean_pool, "max": functional.masked_max_pool}
_HAS_PADDED_FORWARD = hasattr(st_modules.Pooling, "_forward_padded")


class Pooling(st_modules.Pooling):
    """sentence-transformers' ``Pooling`` with ``mean`` and ``max`` on the fused kernels."""

    def _modes(self) -> tuple[str, ...]:
        mode = getattr(self, "pooling_mode", None)
        if mode is None:  # releases before 5.x: one boolean per mode
            return tuple(
                name for name in ("cls", "max", "mean") if getattr(self, f"pooling_mode_{name}_tokens", False)
            )
        return (mode,) if isinstance(mode, str) else tuple(mode)

    def _forward_padded(
        self, token_embeddings: Tensor, attention_mask: Tensor, features: dict, prompt_length=None
    ):
        modes = self._modes()
        fused = {mode for mode in modes if mode in FUSED_MODES}
        if "token_weights_sum" in features:
            fused.discard("mean")  # the mean is then divided by the given weights, not the token count
        if not fused:
            return super()._forward_padded(
                token_embeddings, attention_mask, features, prompt_length=prompt_length
            )
        mask = (
            self._exclude_prompt_from_mask(attention_mask, prompt_length) if prompt_length else attention_mask
        )
        others = [mode for mode in modes if mode not in fused]
        other_vectors = iter(self._unfused(others, token_embeddings, attention_mask, features, prompt_length))
        return [
            FUSED_MODES[mode](token_embeddings, mask) if mode in fused else next(other_vectors)
            for mode in modes
        ]

    def _unfused(self, modes, token_embeddings, attention_mask, features, prompt_length) -> list[Tensor]:
        """sentence-transformers' own code for ``modes``, on a shallow copy configured for them."""
        if not modes:
            return []
        view = copy.copy(self)
        object.__setattr__(view, "pooling_mode", modes[0] if len(modes) == 1 else tuple(modes))
        return st_modules.Pooling._forward_padded(
            view, token_embeddings, attention_mask, features, prompt_length=prompt_length
        )


# Saved models name the class by this path: sentence-transformers' own (module docstring).
Pooling.__module__ = st_modules.Pooling.__module__


if not _HAS_PADDED_FORWARD:
    warnings.warn(
        "simcse_fast.sentence_transformers.models.Pooling: this sentence-transformers release has no "
        "Pooling._forward_padded; Pooling runs sentence-transformers' code unchanged (no fusion).",
        UserWarning,
        stacklevel=2,
    )


def _swap_pooling(model, target_class, source_class):
    for name, module in list(model._modules.items()):
        if type(module) is source_class:
            swapped = copy.copy(module)
            swapped.__class__ = target_class
            model._modules[name] = swapped
    return model


def apply_fused_pooling(model):
    """Replace every sentence-transformers ``Pooling`` module of ``model`` (a
    ``SentenceTransformer``) by the fused ``Pooling``, in place, keeping its configuration.
    Returns ``model``."""
    return _swap_pooling(model, Pooling, st_modules.Pooling)


def restore_pooling(model):
    """Undo :func:`apply_fused_pooling`: sentence-transformers' own ``Pooling`` again."""
    return _swap_pooling(model, st_modules.Pooling, Pooling)
