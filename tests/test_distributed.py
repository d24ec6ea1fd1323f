"""Negatives across processes (torch.distributed, gloo on CPU): each rank's loss and gradients,
averaged as DistributedDataParallel averages them, equal the single-process loss on the whole
batch; the sentence-transformers drop-in matches sentence-transformers' own gathered loss."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from inputs import cpu_backends

import simcse_fast as sf
from simcse_fast import distributed

ANCHORS_PER_RANK, DIM = 5, 12

CASES = {
    # name: (candidates per rank, info_nce options); labels "random" index the rank's candidates
    "plain": (5, {}),
    "hard-negatives": (8, {}),
    "labels": (8, {"labels": "random"}),
    "symmetric": (5, {"symmetric": True}),
    "symmetric-hard-negatives": (7, {"symmetric": True}),
    "per-anchor": (6, {"reduction": "none"}),
    "matryoshka": (8, {"matryoshka_dims": [12, 5, 8], "matryoshka_weights": [1.0, 2.0, 0.5]}),
    "matryoshka-symmetric": (7, {"symmetric": True, "matryoshka_dims": [3, 12]}),
}


def batch(world: int, n_candidates: int, options: dict, seed: int):
    """The whole batch, every rank's block: anchors (world, N, D), candidates (world, M, D) and
    labels (world, N) or None."""
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(world, ANCHORS_PER_RANK, DIM, generator=generator)
    candidates = torch.randn(world, n_candidates, DIM, generator=generator)
    labels = None
    if options.get("labels") == "random":
        labels = torch.randint(0, n_candidates, (world, ANCHORS_PER_RANK), generator=generator)
    return anchors, candidates, labels


def _worker(rank: int, world: int, store: str, out_dir: str, backend: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for seed, (name, (n_candidates, options)) in enumerate(CASES.items()):
            anchors, candidates, labels = batch(world, n_candidates, options, seed)
            a = anchors[rank].clone().requires_grad_()
            c = candidates[rank].clone().requires_grad_()
            kwargs = {**options, "labels": None if labels is None else labels[rank]}
            loss = sf.info_nce(a, c, gather_across_devices=True, backend=backend, **kwargs)
            loss.sum().backward()
            results[name] = (loss.detach(), a.grad, c.grad)
        queries = torch.randn(4, DIM, generator=torch.Generator().manual_seed(100 + rank))
        keys = torch.randn(4, DIM, generator=torch.Generator().manual_seed(200 + rank))
        results["similarity_logsumexp"] = sf.similarity_logsumexp(
            queries, keys, exclude_diagonal=True, gather_across_devices=True, backend=backend
        )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, tmp_path, backend: str = "torch") -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path), backend), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def expected_full_batch(world: int, name: str, backend: str):
    """One process, the whole batch: the per-anchor losses and the gradients of their mean
    (what DDP's averaged per-rank means amount to), laid out per rank like the inputs."""
    n_candidates, options = CASES[name]
    anchors, candidates, labels = batch(world, n_candidates, options, list(CASES).index(name))
    n = ANCHORS_PER_RANK
    a = anchors.reshape(world * n, DIM).clone().requires_grad_()
    if options.get("symmetric"):
        # Positives first, then every rank's extra negatives: the layout symmetric=True reads.
        starts = torch.arange(world)[:, None] * n_candidates
        positives, negatives = starts + torch.arange(n), starts + torch.arange(n, n_candidates)
        order = torch.cat([positives.reshape(-1), negatives.reshape(-1)])
    else:
        order = torch.arange(world * n_candidates)
    flat = candidates.reshape(world * n_candidates, DIM)
    c = flat[order].clone().requires_grad_()
    kwargs = {key: value for key, value in options.items() if key != "labels"}
    kwargs["reduction"] = "none"
    if not options.get("symmetric"):
        # Anchor i of rank r faces candidate labels[r, i] (default i) of rank r's block.
        local = torch.arange(n).expand(world, n) if labels is None else labels
        kwargs["labels"] = (local + torch.arange(world)[:, None] * n_candidates).reshape(-1)
    per_anchor = sf.info_nce(a, c, backend=backend, **kwargs)
    per_anchor.mean().backward()
    grad_candidates = torch.empty_like(flat)
    grad_candidates[order] = c.grad
    return (
        per_anchor.detach(),
        a.grad.reshape(world, n, DIM),
        grad_candidates.reshape(world, n_candidates, DIM),
    )


@pytest.mark.parametrize("world", [2, 3])
def test_info_nce_across_ranks_equals_the_whole_batch(world, tmp_path):
    results = run_ranks(world, tmp_path)
    for name, (_, options) in CASES.items():
        per_anchor, grad_anchors, grad_candidates = expected_full_batch(world, name, "torch")
        for rank, result in enumerate(results):
            loss, grad_a, grad_c = result[name]
            local = per_anchor[rank * ANCHORS_PER_RANK : (rank + 1) * ANCHORS_PER_RANK]
            want_loss = local if options.get("reduction") == "none" else local.mean()
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6, msg=f"{name} loss rank {rank}")
            # A rank's gradients are of its own mean (or per-anchor losses summed); DDP divides
            # the sum over ranks by the world size, so the per-anchor case is scaled to match.
            per_anchor_sum = options.get("reduction") == "none"
            factor = 1.0 / (world * ANCHORS_PER_RANK) if per_anchor_sum else 1.0 / world
            for got, want, what in (
                (grad_a, grad_anchors, "anchors"),
                (grad_c, grad_candidates, "candidates"),
            ):
                torch.testing.assert_close(
                    got * factor, want[rank], rtol=1e-5, atol=1e-6, msg=f"{name} d{what} rank {rank}"
                )
    keys = torch.cat(
        [torch.randn(4, DIM, generator=torch.Generator().manual_seed(200 + r)) for r in range(world)]
    )
    for rank, result in enumerate(results):
        queries = torch.randn(4, DIM, generator=torch.Generator().manual_seed(100 + rank))
        local_first = torch.cat([keys[rank * 4 :], keys[: rank * 4]])
        want = sf.similarity_logsumexp(queries, local_first, exclude_diagonal=True, backend="torch")
        torch.testing.assert_close(result["similarity_logsumexp"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_info_nce_across_ranks_triton(tmp_path):
    results = run_ranks(2, tmp_path, backend="triton")
    for name in ("plain", "symmetric-hard-negatives", "labels"):
        per_anchor, grad_anchors, grad_candidates = expected_full_batch(2, name, "torch")
        for rank, result in enumerate(results):
            loss, grad_a, grad_c = result[name]
            local = per_anchor[rank * ANCHORS_PER_RANK : (rank + 1) * ANCHORS_PER_RANK]
            torch.testing.assert_close(loss, local.mean(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad_a / 2, grad_anchors[rank], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grad_c / 2, grad_candidates[rank], rtol=1e-4, atol=1e-5)


def test_without_a_process_group_gathering_changes_nothing(generator):
    anchors, candidates = torch.randn(6, 8, generator=generator), torch.randn(9, 8, generator=generator)
    assert not distributed.is_distributed()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.all_gather_with_grad(candidates) is candidates
    plain = sf.info_nce(anchors, candidates, backend="torch")
    gathered = sf.info_nce(anchors, candidates, backend="torch", gather_across_devices=True)
    assert torch.equal(plain, gathered)
