"""Host synchronization seen from a test: a dispatch mode over the aten calls that wait for the
device or copy host data to it. On CPU tensors nothing waits, but the same calls show where a GPU
would, so CPU tests hold GPU code to "no host synchronization"."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import simcse_fast

HOST_SYNCHRONIZING = {
    "aten._local_scalar_dense.default": ".item(), float(t), int(t), bool(t), .tolist()",
    "aten.item.default": ".item()",
    "aten.is_nonzero.default": "bool(t), an if on a tensor",
    "aten.equal.default": "torch.equal",
    "aten.lift_fresh.default": "torch.tensor(data) or indexing by a Python list: a host-to-device copy",
    "aten.lift_fresh_copy.default": "torch.tensor(data): a host-to-device copy",
    "aten.nonzero.default": "nonzero: an output shape read back",
    "aten.masked_select.default": "masked_select: an output shape read back",
    "aten.unique_dim.default": "unique: an output shape read back",
    "aten._unique2.default": "unique: an output shape read back",
}
"""The aten calls that wait for the device (or copy host data to it) when the tensors are on a
GPU. On CPU tensors nothing waits, but the same calls show where a GPU would."""


class HostSyncDetector(TorchDispatchMode):
    """Fails at the first aten call in ``HOST_SYNCHRONIZING`` made while active, naming it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reason = HOST_SYNCHRONIZING.get(str(func))
        assert reason is None, f"host synchronization: {func} ({reason})"
        return func(*args, **(kwargs or {}))


_TORCH = Path(torch.__file__).resolve().parent
_HERE = Path(__file__).resolve()
_PACKAGES = {"simcse_fast": Path(simcse_fast.__file__).resolve().parent}
with contextlib.suppress(ImportError):
    import transformers

    _PACKAGES["transformers"] = Path(transformers.__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Sync:
    """One host synchronization: the aten call, why it synchronizes, and where it came from: the
    innermost Python frame outside PyTorch (``file:line function``) and that file's package."""

    call: str
    reason: str
    where: str
    package: str


@dataclasses.dataclass(frozen=True)
class AsyncCopy:
    """A copy to the device from pinned memory, ``non_blocking``: no synchronization."""

    where: str
    package: str


def _caller() -> tuple[str, str]:
    """The innermost frame outside PyTorch and this module, and its top-level package."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not path.is_relative_to(_TORCH) and path != _HERE:
            package = next((name for name, root in _PACKAGES.items() if path.is_relative_to(root)), "other")
            return f"{path.name}:{frame.f_lineno} {frame.f_code.co_name}", package
        frame = frame.f_back
    return "?", "other"


class HostSyncRecorder(TorchDispatchMode):
    """Records every host synchronization made while active in ``events``: the calls of
    ``HOST_SYNCHRONIZING`` and copies between the host and a device, except a copy to the
    device from pinned memory with ``non_blocking=True``, which waits for nothing (recorded as
    an :class:`AsyncCopy`). A test can put markers of its own among the events (:meth:`mark`)."""

    def __init__(self):
        super().__init__()
        self.events: list = []

    def mark(self, label) -> None:
        self.events.append(label)

    def _copy_reason(self, func, args, kwargs) -> str | None:
        if func is torch.ops.aten.copy_.default:
            target, source = args[0].device, args[1]
            non_blocking = (len(args) > 2 and args[2]) or kwargs.get("non_blocking", False)
        elif func is torch.ops.aten._to_copy.default:
            source, target = args[0], kwargs.get("device")
            non_blocking = kwargs.get("non_blocking", False)
        else:
            return None
        if target is None or (source.device.type == "cpu") == (torch.device(target).type == "cpu"):
            return None
        if source.device.type != "cpu":
            return "a copy from the device to the host"
        if non_blocking and source.is_pinned():
            self.events.append(AsyncCopy(*_caller()))
            return None
        return "a copy from the host to the device that waits for the host (blocking, or pageable memory)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = HOST_SYNCHRONIZING.get(str(func)) or self._copy_reason(func, args, kwargs)
        if reason is not None:
            self.events.append(Sync(str(func), reason, *_caller()))
        return func(*args, **kwargs)
