"""sentence-transformers' ``models`` with ``Pooling`` on fused mean and max pooling.

Every public name of sentence-transformers' ``models`` (``sentence_transformer.modules`` from
5.4) is here too, the same object (``Transformer``, ``Dense``, ``Normalize``, ...), so a script
works with only its import changed; ``Pooling`` is the drop-in below.

``Pooling`` takes the same constructor arguments and config (all modes, ``include_prompt``,
save/load) as sentence-transformers' module; ``mean`` and ``max`` run on
``simcse_fast.masked_mean_pool`` / ``masked_max_pool`` (padded batches) and
``packed_mean_pool`` / ``packed_max_pool`` (flattened batches with ``cu_seq_lens_q``), every
other mode on sentence-transformers' own code. So does ``mean`` with a floating attention mask
(sentence-transformers then takes the mask-weighted mean; the fused kernel counts tokens) or
with ``token_weights_sum`` in the features. One deliberate difference: a row with no token left
(all padding, or only prompt tokens with ``include_prompt=False``) max-pools to zeros, where
sentence-transformers gives ``-inf`` (``-1e9`` before 5.4).

sentence-transformers' private methods change between releases, so each one is overridden only
where its signature is the one this module was written against (checked at import):
``_forward_padded`` and ``_forward_flattened`` (5.4 and later; ``prompt_length`` is passed on
only where they take it), and ``forward`` itself for releases that pool inline with one boolean
per mode (3.x to 5.3). Anything else runs sentence-transformers' code unfused, after one
warning at import.

Saving: a ``SentenceTransformer`` records each module's class by its import path, and
sentence-transformers refuses to import classes from other packages unless told to trust remote
code. The fused ``Pooling`` therefore presents itself under sentence-transformers' own path
(its ``__module__``): a saved model names sentence-transformers' ``Pooling``, with the same
config, and loads in plain sentence-transformers, simcse_fast installed or not. Call
``apply_fused_pooling`` after loading to get the fused kernels again. Pickling (``torch.save``
of a whole model, multi-process encoding) likewise rebuilds sentence-transformers' class with
the same state: same results, unfused. ``copy.copy`` and ``copy.deepcopy`` keep the fused
class.

``apply_fused_pooling(model)`` swaps every Pooling module of an existing ``SentenceTransformer``
in place, nested ones (in a ``Router`` route, an ``Asym``) included (the Liger-Kernel ``apply``
convention); ``restore_pooling(model)`` swaps them back.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import Tensor

from .. import functional
from ._compat import reexport, st_modules

__all__ = ["Pooling", "apply_fused_pooling", "restore_pooling"]

_ST_POOLING = st_modules.Pooling

FUSED_MODES = {"mean": functional.masked_mean_pool, "max": functional.masked_max_pool}
PACKED_MODES = {"mean": functional.packed_mean_pool, "max": functional.packed_max_pool}

# Releases before 5.4 store one boolean per mode; their forward concatenates in this order.
_LEGACY_MODE_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def _parameter_names(name: str) -> list[str] | None:
    method = getattr(_ST_POOLING, name, None)
    return None if method is None else list(inspect.signature(method).parameters)


def _takes(name: str, leading: list[str], optional: set[str]) -> tuple[bool, bool]:
    """Whether sentence-transformers' ``Pooling.<name>`` has exactly the ``leading`` parameters
    followed by some of ``optional``, and whether it takes ``prompt_length``."""
    names = _parameter_names(name)
    if names is None or names[: len(leading)] != leading or not set(names[len(leading) :]) <= optional:
        return False, False
    return True, "prompt_length" in names


_PADDED, _PADDED_TAKES_PROMPT = _takes(
    "_forward_padded", ["self", "token_embeddings", "attention_mask", "features"], {"prompt_length"}
)
_FLATTENED, _FLATTENED_TAKES_PROMPT = _takes(
    "_forward_flattened", ["self", "token_embeddings", "features"], {"prompt_length"}
)
# Releases without _forward_padded pool inline in forward(features), one boolean per mode.
_LEGACY = (
    _parameter_names("_forward_padded") is None
    and _takes("forward", ["self", "features"], {"kwargs"})[0]
    and set(_LEGACY_MODE_FLAGS.values()) <= set(inspect.signature(_ST_POOLING.__init__).parameters)
)

if not (_PADDED or _LEGACY):
    warnings.warn(
        "simcse_fast.sentence_transformers.models.Pooling: this sentence-transformers release's Pooling "
        "has neither the _forward_padded(token_embeddings, attention_mask, features[, prompt_length]) nor "
        "the per-mode boolean layout this module knows; Pooling runs sentence-transformers' code unfused.",
        UserWarning,
        stacklevel=2,
    )


def _st_forward_padded(module, token_embeddings, attention_mask, features, prompt_length):
    # Before 6.2 forward() excludes the prompt from the mask itself and never passes prompt_length.
    extra = {"prompt_length": prompt_length} if _PADDED_TAKES_PROMPT else {}
    return _ST_POOLING._forward_padded(module, token_embeddings, attention_mask, features, **extra)


def _st_forward_flattened(module, token_embeddings, features, prompt_length):
    extra = {"prompt_length": prompt_length} if _FLATTENED_TAKES_PROMPT else {}
    return _ST_POOLING._forward_flattened(module, token_embeddings, features, **extra)


def _packed_without_prompt(pool, tokens: Tensor, cu_seqlens: Tensor, prompt_length: int) -> Tensor:
    """``pool`` over each sequence's tokens after its first ``prompt_length`` (none left: an
    empty sequence). Each sequence is split in two segments, prompt and rest, and the rests are
    kept: no host sync, one pass over the tokens."""
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    cuts = torch.minimum(starts + prompt_length, ends)
    split = torch.cat([torch.stack([starts, cuts], dim=1).flatten(), cu_seqlens[-1:]])
    return pool(tokens, split)[1::2]


def _in_mode_order(modes, fused_vectors: dict, unfused) -> list[Tensor]:
    """One vector per mode, in ``modes`` order: ``fused_vectors[mode]`` where computed, else the
    next of ``unfused(others)`` (sentence-transformers' vectors for the other modes, in order)."""
    others = [mode for mode in modes if mode not in fused_vectors]
    other_vectors = iter(unfused(others) if others else ())
    return [fused_vectors[mode] if mode in fused_vectors else next(other_vectors) for mode in modes]


class Pooling(_ST_POOLING):
    """sentence-transformers' ``Pooling`` with ``mean`` and ``max`` on the fused kernels."""

    def _modes(self) -> tuple[str, ...]:
        """The pooling modes in output order."""
        mode = getattr(self, "pooling_mode", None)
        if isinstance(mode, str):
            return (mode,)
        if isinstance(mode, (tuple, list)):
            return tuple(mode)
        return tuple(name for name, flag in _LEGACY_MODE_FLAGS.items() if getattr(self, flag, False))

    def _view(self, modes) -> Pooling:
        """A shallow copy that pools only ``modes``: sentence-transformers' code runs on it for the
        modes that are not fused."""
        view = copy.copy(self)
        if _LEGACY:
            for name, flag in _LEGACY_MODE_FLAGS.items():
                object.__setattr__(view, flag, name in modes)
        else:
            object.__setattr__(view, "pooling_mode", modes[0] if len(modes) == 1 else tuple(modes))
        return view

    @staticmethod
    def _fused_modes(modes, features: dict, attention_mask: Tensor) -> set[str]:
        """The modes among ``modes`` that the fused kernels compute exactly as
        sentence-transformers does for these features."""
        fused = {mode for mode in modes if mode in FUSED_MODES}
        if "token_weights_sum" in features or attention_mask.is_floating_point():
            # sentence-transformers then divides by the given weights or takes the mask-weighted
            # mean; the kernel counts present tokens. Checked by dtype: no device sync.
            fused.discard("mean")
        return fused

    def __repr__(self) -> str:
        """sentence-transformers' repr, with which modes run on the fused kernels: ``print(model)``
        shows whether ``apply_fused_pooling`` took effect."""
        fused = [mode for mode in self._modes() if mode in FUSED_MODES] if _PADDED or _LEGACY else []
        if fused:
            note = f"simcse_fast: {' and '.join(fused)} fused"
        elif _PADDED or _LEGACY:
            note = "simcse_fast: no fused mode here, sentence-transformers' code runs"
        else:
            note = "simcse_fast: unfused on this sentence-transformers release"
        return f"{super().__repr__()} [{note}]"

    def __reduce_ex__(self, protocol):
        """Pickle as sentence-transformers' own ``Pooling`` with the same state (module
        docstring): unpickling needs neither simcse_fast nor this class's import path, which
        ``__module__`` makes point at sentence-transformers' class."""
        # Not copyreg.__newobj__: pickle refuses it for an argument other than type(self).
        return object.__new__, (_ST_POOLING,), self.__getstate__()

    def __copy__(self) -> Pooling:
        """A shallow copy of the fused class (pickling's route would give sentence-transformers')."""
        clone = type(self).__new__(type(self))
        clone.__setstate__(self.__getstate__())
        return clone

    def __deepcopy__(self, memo) -> Pooling:
        """A deep copy of the fused class (pickling's route would give sentence-transformers')."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    if _PADDED:

        def _forward_padded(
            self, token_embeddings: Tensor, attention_mask: Tensor, features: dict, prompt_length=None
        ) -> list[Tensor]:
            """One pooled vector per mode of a padded batch: the fused kernels for mean and max
            (the prompt left out of their mask where ``prompt_length`` is given),
            sentence-transformers' code for the rest."""
            modes = self._modes()
            fused = self._fused_modes(modes, features, attention_mask)
            if not fused:
                return _st_forward_padded(self, token_embeddings, attention_mask, features, prompt_length)
            mask = (
                self._exclude_prompt_from_mask(attention_mask, prompt_length)
                if prompt_length
                else attention_mask
            )
            return _in_mode_order(
                modes,
                {mode: FUSED_MODES[mode](token_embeddings, mask) for mode in fused},
                lambda others: _st_forward_padded(
                    self._view(others), token_embeddings, attention_mask, features, prompt_length
                ),
            )

    if _FLATTENED:

        def _forward_flattened(
            self, token_embeddings: Tensor, features: dict, prompt_length=None
        ) -> list[Tensor]:
            """One pooled vector per mode of a flattened batch (``features["cu_seq_lens_q"]``):
            the packed kernels for mean and max, sentence-transformers' code for the rest."""
            modes = self._modes()
            fused = {mode for mode in modes if mode in PACKED_MODES}
            if not fused:
                return _st_forward_flattened(self, token_embeddings, features, prompt_length)
            tokens = token_embeddings.squeeze(0)  # (1, total_tokens, H), as sentence-transformers reads it
            cu_seqlens = features["cu_seq_lens_q"]
            fused_vectors = {
                mode: (
                    _packed_without_prompt(PACKED_MODES[mode], tokens, cu_seqlens, prompt_length)
                    if prompt_length
                    else PACKED_MODES[mode](tokens, cu_seqlens)
                )
                for mode in fused
            }
            return _in_mode_order(
                modes,
                fused_vectors,
                lambda others: _st_forward_flattened(
                    self._view(others), token_embeddings, features, prompt_length
                ),
            )

    if _LEGACY:

        def forward(self, features: dict, **kwargs) -> dict:
            """sentence-transformers' forward of releases before 5.4 (one boolean per mode,
            fixed output order), with mean and max fused."""
            token_embeddings = features["token_embeddings"]
            attention_mask = features.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones(
                    token_embeddings.shape[:-1], device=token_embeddings.device, dtype=torch.int64
                )
            modes = self._modes()
            fused = self._fused_modes(modes, features, attention_mask)
            if not fused:
                return super().forward(features, **kwargs)
            mask = attention_mask
            if not self.include_prompt and "prompt_length" in features:
                # These releases zero the first prompt_length columns of the caller's mask in
                # place; the fused modes read a copy, the others get sentence-transformers' code.
                prompt_length = features["prompt_length"]
                if isinstance(prompt_length, Tensor):
                    prompt_length = prompt_length[0].item()
                mask = attention_mask.clone()
                mask[:, :prompt_length] = 0

            def unfused(others):
                # Each mode gives token_embeddings.shape[-1] columns, concatenated in mode order.
                embedding = _ST_POOLING.forward(self._view(others), features, **kwargs)["sentence_embedding"]
                return embedding.split(token_embeddings.shape[-1], dim=-1)

            fused_vectors = {mode: FUSED_MODES[mode](token_embeddings, mask) for mode in fused}
            features["sentence_embedding"] = torch.cat(_in_mode_order(modes, fused_vectors, unfused), dim=-1)
            return features


# Saved models name the class by this path: sentence-transformers' own (module docstring).
Pooling.__module__ = _ST_POOLING.__module__


def _swap_pooling(model, target_class, source_class):
    for module in model.modules():
        if type(module) is source_class:
            # In place: every reference to the module (a route of a Router, a shared
            # instance) sees the swap. Pooling has no parameters or buffers to move.
            module.__class__ = target_class
    return model


def apply_fused_pooling(model):
    """Make every sentence-transformers ``Pooling`` module of ``model`` (a ``SentenceTransformer``
    or any ``nn.Module``), nested ones included, the fused ``Pooling``, in place, keeping its
    configuration. Returns ``model``."""
    return _swap_pooling(model, Pooling, _ST_POOLING)


def restore_pooling(model):
    """Undo :func:`apply_fused_pooling`: sentence-transformers' own ``Pooling`` again, in place."""
    return _swap_pooling(model, _ST_POOLING, Pooling)


# Everything else of sentence-transformers' module, under this one: one import swap suffices.
__all__, __getattr__, __dir__ = reexport(globals(), st_modules)
