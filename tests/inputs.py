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


def training_config(model_dir, sentences, output, **settings):
    """A ``TrainingConfig`` for a test model on CPU without a progress bar: batches of 4 at
    lr 1e-3; ``settings`` add to these or replace them."""
    from simcse_fast import training

    options = {
        "sentences": str(sentences), "output": str(output), "model": str(model_dir), "batch_size": 4,
        "lr": 1e-3, "device": "cpu", "show_progress_bar": False,
    }  # fmt: skip
    return training.TrainingConfig(**{**options, **settings})


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


EAGER_RULE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""About 100 ulps of fp32, 1 of fp16, 2 of bf16: the floor where the projection through the norm
amplifies rounding (a row whose gradient is mostly along its own direction) and eager happens to
be exact."""
EAGER_RULE_QUANTILES = (0.5, 0.9, 1.0)


def row_errors(actual: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``|actual_i - truth_i| / |truth_i|`` per row of 2-D float64 tensors; rows whose truth is
    exactly zero (a batch of one: the loss is constant) must come out exactly zero."""
    norms = truth.norm(dim=1)
    zero = norms == 0
    assert torch.equal(actual[zero], torch.zeros_like(actual[zero])), "a zero gradient row came out non-zero"
    return (actual[~zero] - truth[~zero]).norm(dim=1) / norms[~zero]


def assert_within_eager(ours, eager, truth, dtype, loss_scale: float, what: str, names) -> None:
    """Flash-attention's rule for each gradient (lists of 2-D float64 tensors, one row per
    vector): at the median, 90th percentile and worst row, our row error against ``truth`` is at
    most twice eager PyTorch's in ``dtype`` (or twice that of the correctly rounded truth, where
    the gradient times ``loss_scale`` is not representable in ``dtype``) plus a small atol."""
    for name, got, baseline, true in zip(names, ours, eager, truth, strict=True):
        rounded = (true * loss_scale).to(dtype).double() / loss_scale
        errors, eager_errors, floor = (
            row_errors(got, true),
            row_errors(baseline, true),
            row_errors(rounded, true),
        )
        if errors.numel() == 0:
            continue
        for q in EAGER_RULE_QUANTILES:
            ours_q, eager_q, floor_q = (torch.quantile(e, q).item() for e in (errors, eager_errors, floor))
            allowed = 2 * max(eager_q, floor_q) + EAGER_RULE_ATOL[dtype]
            assert ours_q <= allowed, (
                f"{what} d{name}: row error quantile {q} is {ours_q:.3g} > {allowed:.3g} "
                f"(eager {eager_q:.3g}, correctly rounded {floor_q:.3g})"
            )


def model_weights(folder) -> dict:
    """The parameters of the SimCSE model saved in ``folder``."""
    import simcse_fast as sf

    return {name: p.detach().clone() for name, p in sf.SimCSE(str(folder), device="cpu").named_parameters()}


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    """Make training raise KeyboardInterrupt right after it writes the checkpoint of ``step``."""
    from simcse_fast import training

    save_checkpoint = training._save_checkpoint

    def interrupt(folder, state, keep):
        save_checkpoint(folder, state, keep)
        if state["position"]["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", interrupt)
