"""The loss at five Matryoshka dimensions against one full-dimension loss and against
sentence-transformers' MatryoshkaLoss: time and peak memory of a forward + backward.

    python benchmarks/matryoshka.py [--batch 4096] [--dim 768] [--rounds 7] [--threads 1] [--out DIR]

Every implementation scores the same B anchors against their B positives (fp32, D columns) with
scale 20 at the dimensions 768, 512, 256, 128, 64 (sentence-transformers' example; for another
``--dim``, D and D / 1.5, 3, 6, 12) or at D alone:

* ``simcse_fast, one dimension``: ``sf.info_nce(a, p)``;
* ``simcse_fast, Matryoshka``: ``sf.info_nce(a, p, matryoshka_dims=..., matryoshka_weights=None)``;
* ``simcse_fast drop-in MatryoshkaLoss``: ``simcse_fast.sentence_transformers.losses`` over its
  MultipleNegativesRankingLoss;
* ``sentence-transformers MNRL, one dimension`` and ``sentence-transformers MatryoshkaLoss``
  (over its MultipleNegativesRankingLoss), through their ``forward`` with a stand-in model whose
  features are the embeddings.

Time: one process runs rounds of every implementation in turn, so that a change in the machine's
speed reaches all of them; each run is timed by the process's CPU time (with one thread, the
computation's own time, whatever other processes take from the cores) and by the wall clock.
Reported: the median and p20/p80 of each, and the median over rounds of each implementation's
ratio to ``simcse_fast, one dimension`` in the same round. Peak memory: a fresh process per
implementation, the growth of the resident set's high-water mark over one forward + backward
after a warm-up (as ``simcse-fast bench`` measures it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ONE_DIM = "simcse_fast, one dimension"
IMPLEMENTATIONS = (
    ONE_DIM,
    "simcse_fast, Matryoshka",
    "simcse_fast drop-in MatryoshkaLoss",
    "sentence-transformers MNRL, one dimension",
    "sentence-transformers MatryoshkaLoss",
)


def matryoshka_dims(dim: int) -> list[int]:
    return [dim, dim * 2 // 3, dim // 3, dim // 6, dim // 12]


def build(implementation: str, batch: int, dim: int):
    """``(inputs, step)``: the leaf embeddings and a function running forward + backward on them."""
    import torch

    import simcse_fast as sf

    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(batch, dim, generator=generator)
    positives = anchors + 0.35 * torch.randn(batch, dim, generator=generator)
    leaves = [anchors.requires_grad_(), positives.requires_grad_()]
    dims = matryoshka_dims(dim)
    if implementation.startswith("simcse_fast,"):
        chosen = dims if "Matryoshka" in implementation else None

        def loss():
            return sf.info_nce(leaves[0], leaves[1], scale=20.0, matryoshka_dims=chosen)
    else:
        from simcse_fast.sentence_transformers import losses
        from simcse_fast.sentence_transformers._compat import st_losses

        class EmbeddingColumns(torch.nn.Module):
            def forward(self, features):
                return {"sentence_embedding": features["embedding"]}

            def get_embedding_dimension(self):  # asked by sentence-transformers >= 5.4
                return dim

            get_sentence_embedding_dimension = get_embedding_dimension

        model = EmbeddingColumns()
        module = losses if implementation.startswith("simcse_fast drop-in") else st_losses
        criterion = module.MultipleNegativesRankingLoss(model, scale=20.0)
        if "MatryoshkaLoss" in implementation:
            criterion = module.MatryoshkaLoss(model, criterion, dims)
        labels = torch.empty(0)

        def loss():
            return criterion([{"embedding": leaves[0]}, {"embedding": leaves[1]}], labels)

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss().backward()

    return step


def worker(implementation: str, batch: int, dim: int, threads: int) -> dict:
    """Peak extra memory of one forward + backward after a warm-up, in this fresh process."""
    import torch

    from simcse_fast import bench

    torch.set_num_threads(threads)
    step = build(implementation, batch, dim)
    step()
    measured = {}
    with bench.Device(torch.device("cpu")).peak_memory(measured):
        step()
    return {"peak_extra_mb": measured["peak_mem_mb"]}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p20": at(0.2), "median": statistics.median(ordered), "p80": at(0.8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="directory for matryoshka.json and matryoshka.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.dim, args.threads)))
        return
    import sentence_transformers
    import torch

    from simcse_fast import bench

    torch.set_num_threads(args.threads)
    steps = {name: build(name, args.batch, args.dim) for name in IMPLEMENTATIONS}
    for step in steps.values():
        step()  # warm-up
    cpu = {name: [] for name in IMPLEMENTATIONS}
    wall = {name: [] for name in IMPLEMENTATIONS}
    for round_ in range(args.rounds):
        for name, step in steps.items():
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            step()
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started_wall)
        print(
            f"round {round_ + 1}: " + ", ".join(f"{n} {cpu[n][-1]:.2f}s" for n in IMPLEMENTATIONS), flush=True
        )
    rows = []
    for name in IMPLEMENTATIONS:
        command = [sys.executable, __file__, "--worker", name, "--batch", str(args.batch),
                   "--dim", str(args.dim), "--threads", str(args.threads)]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        memory = json.loads(completed.stdout.strip().splitlines()[-1])
        ratios = [time_ / one for time_, one in zip(cpu[name], cpu[ONE_DIM], strict=True)]
        wall_ratios = [time_ / one for time_, one in zip(wall[name], wall[ONE_DIM], strict=True)]
        wall_spread = percentiles(wall[name])
        rows.append({
            "impl": name, "cpu_s": percentiles(cpu[name]), "wall_s": wall_spread,
            "cpu_ratio": statistics.median(ratios), "wall_ratio": statistics.median(wall_ratios),
            "busy": wall_spread["p80"] > bench.BUSY_SPREAD * wall_spread["p20"], **memory,
        })  # fmt: skip
    device = (
        f"cpu ({platform.machine()}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})"
    )
    dims = ", ".join(map(str, matryoshka_dims(args.dim)))
    lines = [
        f"Matryoshka loss, forward + backward: B = {args.batch} anchors and positives, D = {args.dim}, fp32, "
        f"dimensions {dims}; {device}; torch {torch.__version__}, sentence-transformers "
        f"{sentence_transformers.__version__}; commit {bench.git_commit()}; {args.rounds} interleaved rounds",
        "",
        "| implementation | CPU s, median (p20-p80) | x one dimension (CPU) | wall s, median (p20-p80) "
        "| x one dimension (wall) | peak extra MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        c, w = row["cpu_s"], row["wall_s"]
        lines.append(
            f"| {row['impl']} | {c['median']:.2f} ({c['p20']:.2f}-{c['p80']:.2f}) | {row['cpu_ratio']:.2f} "
            f"| {w['median']:.2f} ({w['p20']:.2f}-{w['p80']:.2f}) | {row['wall_ratio']:.2f} "
            f"| {row['peak_extra_mb']:.0f} |"
        )
    busy = [row["impl"] for row in rows if row["busy"]]
    if busy:
        lines += ["", f"Busy machine (wall p80/p20 > {bench.BUSY_SPREAD}): {', '.join(busy)}."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        document = {
            "device": device, "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__, "commit": bench.git_commit(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "batch": args.batch, "dim": args.dim, "dims": matryoshka_dims(args.dim), "rounds": args.rounds,
            "cpu_s": cpu, "wall_s": wall, "rows": rows,
        }  # fmt: skip
        (out / "matryoshka.json").write_text(json.dumps(document, indent=2) + "\n")
        (out / "matryoshka.md").write_text(table)


if __name__ == "__main__":
    main()
