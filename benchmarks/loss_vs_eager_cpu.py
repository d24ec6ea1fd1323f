"""The loss's torch path against eager PyTorch on a CPU, forward + backward, interleaved.

``python benchmarks/loss_vs_eager_cpu.py [--n 2048] [--dim 768] [--rounds 20] [--out DIR]``

Each round runs ``sf.info_nce(backend="torch")`` and the eager reference (normalize, matmul,
cross-entropy, autograd) once each, in alternating order, on the same fp32 inputs, so a busy machine
slows both alike; the ratio of the medians is the figure. Writes ``loss_vs_eager.json`` and
``loss_vs_eager.md`` (environment, p20/p50/p80 of each, the ratio) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import simcse_fast as sf
from simcse_fast import reference


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _forward_backward(fn, anchors: torch.Tensor, candidates: torch.Tensor) -> float:
    leaves = [anchors.clone().requires_grad_(), candidates.clone().requires_grad_()]
    start = time.perf_counter()
    fn(*leaves).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="anchors = candidates (default 2048)")
    parser.add_argument("--dim", type=int, default=768, help="embedding size (default 768)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds after one warm-up (default 20)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(args.n, args.dim, generator=generator)
    candidates = torch.randn(args.n, args.dim, generator=generator)
    contenders = {
        "simcse_fast torch path": lambda a, c: sf.info_nce(a, c, backend="torch"),
        "eager PyTorch": reference.info_nce,
    }
    times = {name: [] for name in contenders}
    for fn in contenders.values():
        _forward_backward(fn, anchors, candidates)
    for round_ in range(args.rounds):
        order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in order:
            times[name].append(_forward_backward(contenders[name], anchors, candidates) * 1e3)
    summary = {}
    for name, values in times.items():
        quintiles = statistics.quantiles(values, n=5)
        summary[name] = {"p20": quintiles[0], "p50": statistics.median(values), "p80": quintiles[3]}
    ours, eager = (summary[name]["p50"] for name in contenders)
    result = {
        "environment": {
            "commit": _commit(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "shape": {"N": args.n, "M": args.n, "D": args.dim, "dtype": "float32"},
        "rounds": args.rounds,
        "milliseconds": summary,
        "ratio_of_medians": ours / eager,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_vs_eager.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# info_nce forward + backward on the CPU, N = M = {args.n}, D = {args.dim}, fp32",
        "",
        f"{args.rounds} interleaved rounds; environment: {json.dumps(result['environment'])}",
        "",
        "| implementation | median ms | p20-p80 ms |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {s['p50']:.1f} | {s['p20']:.1f}-{s['p80']:.1f} |" for name, s in summary.items()),
        "",
        f"Ratio of the medians, simcse_fast / eager: {ours / eager:.3f}",
        "",
    ]
    (args.out / "loss_vs_eager.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
