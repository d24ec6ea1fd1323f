"""The ``simcse-fast`` command.

``simcse-fast demo``: pools a random batch with every backend that runs here, checks each
against the float64 reference and prints the error and the time of forward + backward.
``simcse-fast info``: versions and available backends.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time

import torch

from . import __version__, available_backends, functional, reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward_backward(fn, x, mask, grad_out, repeats: int) -> float:
    """Median wall-clock milliseconds of one forward + backward after one warm-up call."""
    times = []
    for attempt in range(repeats + 1):
        x.grad = None
        _synchronize(x.device)
        start = time.perf_counter()
        fn(x, mask).backward(grad_out)
        _synchronize(x.device)
        if attempt:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.seq_len, args.hidden, generator=generator).to(device, dtype)
    lengths = torch.randint(1, args.seq_len + 1, (args.batch,), generator=generator)
    mask = (torch.arange(args.seq_len)[None, :] < lengths[:, None]).to(device)
    grad_out = torch.randn(args.batch, args.hidden, generator=generator).to(device, dtype)
    backends = [name for name in available_backends() if name != "triton" or device.type == "cuda"]

    print(f"simcse_fast {__version__} demo on {device} ({dtype}): token embeddings "
          f"{tuple(x.shape)}, {int(mask.sum())} of {mask.numel()} tokens present")  # fmt: skip
    print(f"{'op':<16} {'backend':<8} {'max |error| vs float64':>24} {'fwd+bwd ms':>11}")
    for name in ("masked_mean_pool", "masked_max_pool"):
        x64 = x.detach().double().requires_grad_()
        expected = getattr(reference, name)(x64, mask)
        expected.backward(grad_out.double())
        for backend in backends:
            op = getattr(functional, name)
            x_ours = x.detach().requires_grad_()
            out = op(x_ours, mask, backend=backend)
            out.backward(grad_out)
            error = max(
                (out.double() - expected).abs().max().item(),
                (x_ours.grad.double() - x64.grad).abs().max().item(),
            )
            timed = functools.partial(op, backend=backend)
            ms = _time_forward_backward(timed, x_ours, mask, grad_out, args.repeats)
            print(f"{name:<16} {backend:<8} {error:>24.3e} {ms:>11.3f}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    print(f"simcse_fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as error:
        print(f"triton unavailable: {error}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    print(f"available backends: {', '.join(available_backends())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simcse-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"simcse_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="pool a random batch with every backend and check it")
    demo.add_argument("--batch", type=int, default=64, help="sequences (B), default 64")
    demo.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (L), default 128")
    demo.add_argument("--hidden", type=int, default=384, help="hidden size (H), default 384")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    demo.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--repeats", type=int, default=10, help="timed repetitions, default 10")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)

    info = commands.add_parser("info", help="versions and available backends")
    info.set_defaults(run=run_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "seq_len", "hidden", "repeats"):
        if getattr(args, name, 1) < 1:
            print(f"simcse-fast: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
