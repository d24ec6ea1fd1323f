"""Checks of the loss ops against the float64 reference, shared by the loss tests."""

from __future__ import annotations

import torch
from inputs import random_embeddings

# Error allowed, by input dtype, relative to a size: for outputs, the largest magnitude of the
# float64 result (at least 1). Forward cosines come from exact products accumulated in fp32,
# so even half inputs give fp32-accurate losses. Gradients are compared at the magnitude of
# their terms, s * max(1/|x|) * max|upstream| (see gradient_size): the log-sum-exp term and
# the positive term nearly cancel for an easy positive, and the half-precision tensor-core
# products of the backward carry errors relative to the terms, not to their difference.
FORWARD_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRADIENT_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (N, M, D): M >= N, extra rows are hard negatives; D not a multiple of the block size.
SHAPES = [(1, 1, 8), (4, 9, 33), (37, 37, 384), (130, 200, 768), (5, 16, 1000), (3, 70, 8)]


def assert_close_scaled(actual, expected, tolerance: float, what: str, size: float | None = None):
    """Finite entries within ``tolerance`` x ``size`` (default: the largest finite magnitude, at
    least 1); infinite and NaN entries (a row with no term has log-sum-exp -inf) must match
    exactly."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = expected.isfinite()
    assert torch.equal(actual[~finite].nan_to_num(0.5), expected[~finite].nan_to_num(0.5)), (
        f"{what}: non-finite"
    )
    if finite.any():
        size = max(1.0, expected[finite].abs().max().item(), size or 0.0)
        error = (actual[finite] - expected[finite]).abs().max().item()
        assert error <= tolerance * size, f"{what}: max error {error:.3e} > {tolerance:.1e} x {size:.3g}"


def make_inputs(n, m, d, dtype, device, generator, scale=20.0):
    queries = random_embeddings((n, d), dtype, generator).to(device)
    keys = random_embeddings((m, d), dtype, generator).to(device)
    scale = torch.tensor(scale, dtype=torch.float32, device=device)
    return queries, keys, scale


def with_grads(fn, queries, keys, scale, generator, **kwargs):
    """``fn``'s output and the gradients of ``<out, w>`` (random ``w``) in queries, keys, scale."""
    leaves = [t.detach().clone().requires_grad_() for t in (queries, keys, scale)]
    out = fn(leaves[0], leaves[1], scale=leaves[2], **kwargs)
    weight = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, weight)
    return out, grads, weight


def gradient_size(queries, keys, scale, upstream_per_row: float) -> float:
    """``s * max(1 / |x|) * upstream``: the magnitude of one gradient term."""
    inverse_norm = torch.cat([queries, keys]).double().norm(dim=1).clamp_min(1e-12).reciprocal().max()
    return abs(scale.item()) * inverse_norm.item() * upstream_per_row


def check_op(ours, ref, queries, keys, scale, dtype, seed, what, **kwargs):
    out, grads, weight = with_grads(ours, queries, keys, scale, torch.Generator().manual_seed(seed), **kwargs)
    queries64, keys64, scale64 = (t.detach().double() for t in (queries, keys, scale))
    expected, expected_grads, _ = with_grads(
        ref, queries64, keys64, scale64, torch.Generator().manual_seed(seed), **kwargs
    )
    assert out.dtype == torch.float32, f"{what}: output dtype {out.dtype}"
    assert_close_scaled(out, expected, FORWARD_TOLERANCE[dtype], f"{what} forward")
    averaged = out.dim() == 0 and kwargs.get("reduction", "mean") == "mean"
    upstream_per_row = weight.abs().max().item() / (queries.shape[0] if averaged else 1)
    for name, grad, expected_grad, input_dtype in zip(
        ("queries", "keys", "scale"), grads, expected_grads, (dtype, dtype, torch.float32), strict=True
    ):
        assert grad.dtype == input_dtype, f"{what}: d{name} dtype {grad.dtype}"
        size = None if name == "scale" else gradient_size(queries, keys, scale, upstream_per_row)
        assert_close_scaled(grad, expected_grad, GRADIENT_TOLERANCE[dtype], f"{what} d{name}", size)
