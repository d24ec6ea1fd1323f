"""Row-wise gradient error of the loss in SimCSE's regime, ours against eager PyTorch in the same
dtype, both against a float64 truth: the figures of the README's numerics table.

    python benchmarks/loss_precision.py [--n 4096] [--dim 64] [--backends torch,triton]

Easy positives (``anchor + 0.35 N(0, 1)``, P_ii ~ 0.9995 at N = 4096), scale 20, mean
reduction. CPU tensors run Triton under the interpreter (set here when no GPU is present). The
GPU check (``benchmarks/gpu_check.py``) reports :func:`gradient_errors` of each loss strategy.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F


def easy_batch(n: int, dim: int, generator: torch.Generator):
    anchors = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return anchors, anchors + 0.35 * torch.randn(n, dim, generator=generator, dtype=torch.float64)


def eager_info_nce(anchors, candidates, symmetric=False):
    """Normalize and multiply in the inputs' dtype, cross-entropy in fp32."""
    logits = (20.0 * (F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T)).float()
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    loss = F.cross_entropy(logits, rows)
    return (loss + F.cross_entropy(logits.T, rows)) / 2 if symmetric else loss


def gradients(fn, anchors, candidates, loss_scale: float):
    leaves = [anchors.detach().clone().requires_grad_(), candidates.detach().clone().requires_grad_()]
    (fn(*leaves) * loss_scale).backward()
    return [leaf.grad.double().cpu() / loss_scale for leaf in leaves]


def median_row_error(actual, truth) -> float:
    return ((actual - truth).norm(dim=1) / truth.norm(dim=1)).median().item()


def row_error_quantiles(actual: torch.Tensor, truth: torch.Tensor) -> dict:
    """The median, 90th percentile and worst of the row errors ``|actual_i - truth_i| / |truth_i|``."""
    errors = (actual - truth).norm(dim=1) / truth.norm(dim=1)
    return {"median": errors.median().item(), "p90": torch.quantile(errors, 0.9).item(),
            "worst": errors.max().item()}  # fmt: skip


def gradient_errors(implementations: dict[str, tuple[Callable, dict | None]], n: int, dim: int, device,
                    dtype: torch.dtype, seed: int = 0) -> list[dict]:  # fmt: skip
    """For each implementation ``name: (loss_fn(anchors, candidates), environment)``, the row
    errors (``row_error_quantiles``) of d anchors and d candidates on one easy batch rounded to
    ``dtype``, against the float64 reference's gradients of the same rounded inputs; the
    environment variables (a pinned strategy) are set for its forward and backward."""
    from simcse_fast import bench, reference

    anchors, candidates = easy_batch(n, dim, torch.Generator().manual_seed(seed))
    a, c = anchors.to(device, dtype), candidates.to(device, dtype)
    truth = gradients(reference.info_nce, a.double(), c.double(), 1.0)
    rows = []
    for name, (loss_fn, environment) in implementations.items():
        with bench.environment_variables(environment):
            grads = gradients(loss_fn, a, c, 1.0)
        for index, tensor in enumerate(("anchors", "candidates")):
            rows.append({"impl": name, "gradient": tensor, **row_error_quantiles(grads[index], truth[index])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--backends", default="torch,triton")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import simcse_fast as sf
    from simcse_fast import reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    anchors, candidates = easy_batch(args.n, args.dim, torch.Generator().manual_seed(0))
    print(f"N = M = {args.n}, D = {args.dim}, device {device}; median row error of d anchors / d candidates")
    print("| backend | dtype | loss scale | simcse_fast | eager PyTorch |")
    print("| --- | --- | --- | --- | --- |")
    cases = [(torch.float16, 2.0**14), (torch.float16, 1.0), (torch.bfloat16, 1.0), (torch.float32, 1.0)]
    for backend in args.backends.split(","):
        for dtype, loss_scale in cases:
            if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
                continue  # the interpreter's bf16 tl.dot is wrong (Triton 3.9)
            a, c = anchors.to(device, dtype), candidates.to(device, dtype)
            truth = gradients(reference.info_nce, a.double(), c.double(), 1.0)
            ours = gradients(functools.partial(sf.info_nce, backend=backend), a, c, loss_scale)
            eager = gradients(eager_info_nce, a, c, loss_scale)
            errors = [
                "/".join(f"{median_row_error(g[k], truth[k]):.2e}" for k in range(2)) for g in (ours, eager)
            ]
            print(f"| {backend} | {str(dtype)[6:]} | {loss_scale:g} | {errors[0]} | {errors[1]} |")


if __name__ == "__main__":
    main()
