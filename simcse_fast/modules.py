"""``InfoNCELoss``: the fused loss as an ``nn.Module`` for any training loop or trainer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional
from ._checks import check_bool, check_reduction

MAX_LEARNABLE_SCALE = 100.0
"""A learnable scale is clamped here, as CLIP clamps its logit scale (temperature >= 0.01)."""


class InfoNCELoss(nn.Module):
    """``sf.info_nce`` as a module: ``loss = InfoNCELoss(...)(anchors (N, D), candidates (M, D),
    labels=None)``, fp32, with the semantics of :func:`simcse_fast.info_nce`.

    ``scale``: the inverse temperature (20 = temperature 0.05). ``learnable_scale=True`` makes
    ``log_scale`` an ``nn.Parameter`` initialized to ``log(scale)``; the forward uses
    ``exp(min(log_scale, log 100))``: CLIP's parametrization and clamp (a clamped scale passes no
    gradient to ``log_scale`` until it comes back below 100). ``symmetric``,
    ``gather_across_devices`` (with ``group``), ``reduction`` and ``backend`` are passed to
    ``info_nce``.
    """

    def __init__(
        self,
        scale: float = 20.0,
        learnable_scale: bool = False,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        reduction: str = "mean",
        backend: str | None = None,
        group=None,
    ):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not (0 < scale < math.inf):
            raise ValueError(f"scale must be a positive, finite number; got {scale}")
        for name, value in (("learnable_scale", learnable_scale), ("symmetric", symmetric),
                            ("gather_across_devices", gather_across_devices)):  # fmt: skip
            check_bool(name, value)
        check_reduction(reduction)
        if learnable_scale and scale > MAX_LEARNABLE_SCALE:
            raise ValueError(f"a learnable scale starts at most at {MAX_LEARNABLE_SCALE:g}; got {scale}")
        self.learnable_scale = learnable_scale
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices
        self.reduction = reduction
        self.backend = backend
        self.group = group
        if learnable_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))
        else:
            self.fixed_scale = float(scale)

    @property
    def scale(self) -> Tensor | float:
        """The scale the forward uses: a 0-dim tensor (with gradient) when learnable."""
        if self.learnable_scale:
            return self.log_scale.clamp(max=math.log(MAX_LEARNABLE_SCALE)).exp()
        return self.fixed_scale

    def forward(self, anchors: Tensor, candidates: Tensor, labels: Tensor | None = None) -> Tensor:
        return functional.info_nce(
            anchors, candidates, labels=labels, scale=self.scale, symmetric=self.symmetric,
            reduction=self.reduction, backend=self.backend, gather_across_devices=self.gather_across_devices,
            group=self.group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        scale = f"learnable, now {self.scale.item():.4g}" if self.learnable_scale else f"{self.fixed_scale:g}"
        return (
            f"scale={scale}, symmetric={self.symmetric}, gather_across_devices={self.gather_across_devices}, "
            f"reduction={self.reduction!r}"
        )
