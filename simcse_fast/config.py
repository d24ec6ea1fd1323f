"""Names and settings that need no PyTorch: the backend names, the pooling modes and the training
configuration with its checks. The ``simcse-fast`` command checks its arguments against them
before it imports PyTorch or transformers, so a mistyped option fails at once."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

BACKENDS = ("auto", "triton", "cuda", "torch")
POOLING_MODES = ("mean", "max", "cls")
DEFAULT_MODEL = "distilroberta-base"
TRAINING_MAX_SEQ_LENGTH = 32
"""Tokens per sentence in training unless ``max_seq_length`` is given (SimCSE's setting); the
saved model keeps the base model's length then."""


PACKED_ATTENTION = "flash_attention_2"
"""The attention implementation (Hugging Face's name) of packed training: flash-attention's
varlen kernels, from the ``flash-attn`` package."""


def packed_attention_missing() -> str | None:
    """Why ``packed`` cannot run in this environment, as far as is known without importing
    PyTorch (the varlen attention's package is missing), else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "--packed needs a varlen attention, flash-attention's (pip install flash-attn, on a CUDA GPU), "
            "and flash-attn is not installed here; without --packed, batches are padded to their longest "
            "sentence"
        )
    return None


def option_name(field: str, flags: bool) -> str:
    """How an error names a setting: the ``simcse-fast train`` flag, or the field itself."""
    return f"--{field.replace('_', '-')}" if flags else field


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class TrainingConfig:
    """Everything a run depends on; saved in each checkpoint."""

    sentences: str
    output: str
    model: str = DEFAULT_MODEL
    batch_size: int = 128
    max_seq_length: int | None = None
    pooling: str = "mean"
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-5
    temperature: float = 0.05
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_steps: int = 500
    keep_checkpoints: int = 2
    resume: bool | str = False
    overwrite: bool = False
    seed: int = 0
    backend: str = "auto"
    min_chars: int = 10
    mlp_head: bool = False
    dev_sts: str | None = None
    device: str | None = None
    show_progress_bar: bool = True
    mini_batch_size: int | None = None
    mini_batch_tokens: int | None = None
    log_steps: int = 10
    compile: bool = False
    packed: bool = False

    def validate(self, *, world_size: int = 1, flags: bool = False) -> None:
        """Raise ``ValueError`` naming the first invalid setting and what it takes: the field
        (``batch_size``), or with ``flags`` the command-line option (``--batch-size``).
        ``world_size``: the number of processes, whose multiple ``batch_size`` must be."""

        def name(field: str) -> str:
            return option_name(field, flags)

        for field in ("batch_size", "epochs", "checkpoint_steps", "keep_checkpoints", "log_steps"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name(field)} must be a positive integer; got {value!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"{name('batch_size')} must be at least 2: the other sentences of a batch are the "
                f"negatives; got {self.batch_size}"
            )
        if self.batch_size % world_size:
            raise ValueError(
                f"{name('batch_size')} ({self.batch_size}) must be a multiple of the number of processes "
                f"({world_size}): each process encodes an equal share of every batch"
            )
        for field in ("max_steps", "mini_batch_size", "mini_batch_tokens", "max_seq_length"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name(field)} must be a positive integer; got {value!r}")
        if not _is_int(self.min_chars) or self.min_chars < 0:
            raise ValueError(f"{name('min_chars')} must be a non-negative integer; got {self.min_chars!r}")
        for field in ("lr", "temperature", "max_grad_norm"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name(field)} must be a positive, finite number; got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(
                f"{name('weight_decay')} must be a non-negative, finite number; got {self.weight_decay!r}"
            )
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"{name('warmup_ratio')} must be in [0, 1); got {self.warmup_ratio!r}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(
                f"{name('pooling')} must be one of {', '.join(POOLING_MODES)}; got {self.pooling!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"{name('backend')} must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.resume not in (True, False, "auto"):
            raise ValueError(f"{name('resume')} must be True, False or 'auto'; got {self.resume!r}")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume continues the run in the output folder and --overwrite deletes it; pick one"
            )
        if self.packed and self.compile:
            raise ValueError(
                f"{name('packed')} and {name('compile')} do not go together: a packed batch's length changes "
                "at every step, and the compiled encoder keeps its shapes few; pick one"
            )
