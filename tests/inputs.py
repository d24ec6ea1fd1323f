"""Input builders and tolerances shared by the tests."""

from __future__ import annotations

import torch

import simcse_fast._triton as triton_support

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Largest error allowed against the float64 reference, relative and absolute, by dtype: a few
# roundings of the output dtype; accumulation is fp32 (fp64 for fp64) everywhere.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process: Triton only under the interpreter."""
    return ["torch", "triton"] if triton_support.TRITON_INTERPRETER else ["torch"]


def random_mask(
    batch: int, seq_len: int, layout: str, generator: torch.Generator, *, empty_row: bool = True
) -> torch.Tensor:
    """A bool mask. ``layout``: ``"right"`` (tokens then padding), ``"left"`` (padding then
    tokens) or ``"random"`` (scattered). Row 0 is all padding when ``empty_row`` and batch > 1."""
    if layout == "random":
        mask = torch.rand(batch, seq_len, generator=generator) < 0.6
    else:
        lengths = torch.randint(0, seq_len + 1, (batch,), generator=generator)
        positions = torch.arange(seq_len)
        if layout == "right":
            mask = positions[None, :] < lengths[:, None]
        else:
            mask = positions[None, :] >= (seq_len - lengths)[:, None]
    if empty_row and batch > 1:
        mask[0] = False
    return mask


def random_embeddings(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


SENTENCES = [
    "the cat sat on the mat",
    "a dog ran fast",
    "the big red car",
    "a small blue house",
    "the sun and the moon",
    "a tree by the road",
    "the slow dog sat",
    "a big cat ran on the road",
]
"""Sentences in the tiny BERT's vocabulary (conftest.tiny_bert_dir)."""
