"""The reference against independent formulations (loops, torch.nn.functional.cross_entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from inputs import random_embeddings, random_mask

from simcse_fast import reference


def test_mean_pool_matches_a_loop(generator):
    x = random_embeddings((5, 9, 6), torch.float64, generator)
    mask = random_mask(5, 9, "random", generator)
    out = reference.masked_mean_pool(x, mask)
    for b in range(5):
        tokens = [x[b, position] for position in range(9) if mask[b, position]]
        expected = torch.stack(tokens).mean(0) if tokens else torch.zeros(6, dtype=torch.float64)
        torch.testing.assert_close(out[b], expected)


def test_max_pool_matches_a_loop(generator):
    x = random_embeddings((5, 9, 6), torch.float64, generator)
    mask = random_mask(5, 9, "random", generator)
    out = reference.masked_max_pool(x, mask)
    for b in range(5):
        tokens = [x[b, position] for position in range(9) if mask[b, position]]
        expected = torch.stack(tokens).amax(0) if tokens else torch.zeros(6, dtype=torch.float64)
        torch.testing.assert_close(out[b], expected)


def test_pooling_keeps_dtype_and_accumulates_in_fp32():
    x = torch.full((1, 4096, 2), 1.0 + 2**-7, dtype=torch.bfloat16)
    mask = torch.ones(1, 4096)
    assert reference.masked_mean_pool(x, mask).dtype == torch.bfloat16
    assert reference.masked_mean_pool(x, mask)[0, 0].item() == 1.0 + 2**-7


def cosine_logits(q, k, scale):
    return scale * F.cosine_similarity(q[:, None, :], k[None, :, :], dim=-1, eps=0)


@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_similarity_logsumexp_matches_explicit_formula(exclude_diagonal, generator):
    q = random_embeddings((6, 5), torch.float64, generator)
    k = random_embeddings((9, 5), torch.float64, generator)
    out = reference.similarity_logsumexp(q, k, scale=7.5, exclude_diagonal=exclude_diagonal)
    logits = cosine_logits(q, k, 7.5)
    for i in range(6):
        terms = [logits[i, j] for j in range(9) if not (exclude_diagonal and i == j)]
        torch.testing.assert_close(out[i], torch.logsumexp(torch.stack(terms), 0))


def test_info_nce_is_cross_entropy_over_scaled_cosine(generator):
    a = random_embeddings((6, 5), torch.float64, generator)
    c = random_embeddings((10, 5), torch.float64, generator)
    labels = torch.randint(0, 10, (6,), generator=generator)
    logits = cosine_logits(a, c, 20.0)
    torch.testing.assert_close(reference.info_nce(a, c), F.cross_entropy(logits, torch.arange(6)))
    torch.testing.assert_close(
        reference.info_nce(a, c, labels=labels, reduction="none"),
        F.cross_entropy(logits, labels, reduction="none"),
    )
    torch.testing.assert_close(
        reference.info_nce(a, c, labels=labels, reduction="sum"),
        F.cross_entropy(logits, labels, reduction="sum"),
    )


def test_symmetric_info_nce_is_the_mean_of_both_directions(generator):
    a = random_embeddings((6, 5), torch.float64, generator)
    c = random_embeddings((8, 5), torch.float64, generator)
    logits = cosine_logits(a, c, 20.0)
    expected = (
        F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits[:, :6].T, torch.arange(6))
    ) / 2
    torch.testing.assert_close(reference.info_nce(a, c, symmetric=True), expected)


def test_tensor_scale_gets_a_gradient(generator):
    a = random_embeddings((4, 3), torch.float64, generator)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss = reference.info_nce(a, a.flip(0), scale=scale)
    loss.backward()
    assert scale.grad is not None and scale.grad.isfinite()


def test_zero_rows_give_zero_similarity(generator):
    q = torch.zeros(2, 4, dtype=torch.float64)
    k = random_embeddings((3, 4), torch.float64, generator)
    out = reference.similarity_logsumexp(q, k, scale=20.0)
    torch.testing.assert_close(out, torch.full((2,), torch.tensor(3.0).log().item(), dtype=torch.float64))
