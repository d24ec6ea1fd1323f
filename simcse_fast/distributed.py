"""Negatives from every process: an all-gather whose backward brings each process the gradient
of its own rows, summed over all processes in rank order (deterministic, no float atomics).

Without an initialized ``torch.distributed`` process group everything here is the identity of a
single process (rank 0 of 1), never an error.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import reads_values_on_host


def is_distributed(group=None) -> bool:
    """Whether a process group is initialized and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group=None) -> int:
    """This process's rank in ``group``, 0 without an initialized process group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    """The number of processes in ``group``, 1 without an initialized process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _check_equal_rows(x: Tensor, group, world: int) -> None:
    """All-gather needs the same shape on every rank; a mismatch would otherwise hang or fail
    deep inside the collective. On CPU tensors (gloo) a mismatch raises ``ValueError`` naming the
    shapes; on GPUs the shapes are compared on the device by an asynchronous assertion (no
    host synchronization in a training step, see ``_checks.reads_values_on_host``)."""
    # Filled in on the device: a tensor built from a Python list would be copied from the host.
    shape = torch.empty(x.dim(), dtype=torch.int64, device=x.device)
    for dim, size in enumerate(x.shape):
        shape[dim].fill_(size)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    message = (
        "gather_across_devices needs tensors of the same shape on every rank "
        "(drop the last incomplete batch, or pad it)"
    )
    if not reads_values_on_host(x):
        torch._assert_async(torch.stack(shapes).eq(shape).all(), message)
        return
    if any(not torch.equal(other, shapes[0]) for other in shapes):
        found = [tuple(s.tolist()) for s in shapes]
        raise ValueError(f"{message}; got {found}")


class _AllGatherWithGrad(torch.autograd.Function):
    """``cat([x_rank0, x_rank1, ...])``; backward: every rank sends rank ``r`` the gradient its
    loss gives rank ``r``'s rows (all-to-all), and each rank sums what it receives in rank order."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        world = dist.get_world_size(group)
        ctx.group, ctx.world = group, world
        x = x.contiguous()
        gathered = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather(list(gathered.chunk(world)), x, group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        received = torch.empty_like(grad)
        dist.all_to_all_single(received, grad, group=ctx.group)
        parts = received.chunk(ctx.world)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total, None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """``(world * rows, ...)``: the rows of every rank in rank order, differentiable; ``x``
    itself without an initialized process group. Every rank must pass the same shape."""
    if not is_distributed(group):
        return x
    _check_equal_rows(x, group, dist.get_world_size(group))
    return _AllGatherWithGrad.apply(x, group)


def local_first(x: Tensor, rows_per_rank: int, group=None) -> Tensor:
    """Rotate gathered rows so that this rank's block comes first and the other ranks follow in
    rank order: the layout in which local row ``i`` of anchors faces gathered row ``i``."""
    offset = get_rank(group) * rows_per_rank
    return x if offset == 0 else torch.cat([x[offset:], x[:offset]])
