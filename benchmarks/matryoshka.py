"""The loss at five Matryoshka dimensions against one full-dimension loss and against
sentence-transformers' MatryoshkaLoss: time and peak memory of a forward + backward, for the plain
loss and the recipes trainers combine it with.

    python benchmarks/matryoshka.py [--batch 4096] [--dim 768] [--rounds 7] [--threads 1]
                                    [--recipes plain hardness gist] [--out DIR]

Every implementation scores B anchors (fp32, D columns) at the dimensions 768, 512, 256, 128, 64
(sentence-transformers' example; for another ``--dim``, D and D / 1.5, 3, 6, 12) or at D alone.
The recipes:

* ``plain``: MultipleNegativesRankingLoss, the B positives as candidates, scale 20;
* ``hardness``: MultipleNegativesRankingLoss with a hard negative per anchor (M = 2B) and hardness
  weighting (``hardness_mode="all_negatives"``, ``hardness_strength=5``: EmbeddingGemma's);
* ``gist``: GISTEmbedLoss's guided negatives with a guide of dimension D / 2 (not truncated, as in
  sentence-transformers' MatryoshkaLoss), temperature 0.01 (scale 100), its anchor-anchor and
  positive-positive blocks.

The implementations of each recipe:

* ``simcse_fast, one dimension``: the functional loss (``sf.info_nce``,
  ``functional.in_batch_negatives_loss``, ``functional.guided_in_batch_negatives_loss``);
* ``simcse_fast, Matryoshka``: the same with ``matryoshka_dims=...`` (one pass);
* ``simcse_fast drop-in MatryoshkaLoss``: ``simcse_fast.sentence_transformers.losses``'
  MatryoshkaLoss over its MultipleNegativesRankingLoss (``gist``: over its CachedGISTEmbedLoss's
  loss stage in one mini-batch);
* ``sentence-transformers, one dimension`` and ``sentence-transformers MatryoshkaLoss`` (over its
  own loss), through their ``forward`` with a stand-in model whose features are the embeddings
  (``gist``: CachedGISTEmbedLoss's loss stage). Its GIST broadcasts each pair's product vector,
  ``(B, B, D)`` per block: where that exceeds ``--memory-gb`` the row says so instead.

Time: one process runs rounds of every implementation in turn, so that a change in the machine's
speed reaches all of them; each run is timed by the process's CPU time (with one thread, the
computation's own time, whatever other processes take from the cores) and by the wall clock.
Reported: the median and p20/p80 of each, and the median over rounds of each implementation's
ratio to its recipe's ``simcse_fast, one dimension`` in the same round. Peak memory: a fresh
process per implementation, the growth of the resident set's high-water mark over one forward +
backward after a warm-up (as ``simcse-fast bench`` measures it on a CPU).
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
    "sentence-transformers, one dimension",
    "sentence-transformers MatryoshkaLoss",
)
RECIPES = ("plain", "hardness", "gist")
RECIPE_NAMES = {
    "plain": "MultipleNegativesRankingLoss",
    "hardness": "MultipleNegativesRankingLoss, a hard negative each, hardness all_negatives x 5",
    "gist": "GISTEmbedLoss, guide D / 2, temperature 0.01",
}
HARDNESS = {"hardness_mode": "all_negatives", "hardness_strength": 5.0}
GIST_TEMPERATURE = 0.01


def matryoshka_dims(dim: int) -> list[int]:
    return [dim, dim * 2 // 3, dim // 3, dim // 6, dim // 12]


def st_gist_need_gb(batch: int, dim: int) -> float:
    """sentence-transformers' GIST loss stage at dimension ``dim``: per block the broadcast
    products of the model's and the guide's pairs (three blocks; an estimate). Its
    MatryoshkaLoss needs the largest dimension's: each dimension's backward runs before the next."""
    return 3 * batch * batch * (dim + dim // 2) * 4 / 1e9


def skip_reason(recipe: str, implementation: str, batch: int, dim: int, memory_gb: float) -> str | None:
    if recipe != "gist" or not implementation.startswith("sentence-transformers"):
        return None
    need = st_gist_need_gb(batch, dim)
    return f"would need {need:.0f} GB" if need > memory_gb else None


def build(recipe: str, implementation: str, batch: int, dim: int):
    """A function running forward + backward of ``implementation`` of ``recipe`` on fixed leaf
    embeddings."""
    import torch

    from simcse_fast import functional
    from simcse_fast.sentence_transformers import losses
    from simcse_fast.sentence_transformers._compat import st_losses

    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(batch, dim, generator=generator)
    columns = [anchors, anchors + 0.35 * torch.randn(batch, dim, generator=generator)]
    if recipe == "hardness":
        columns.append(anchors + 0.7 * torch.randn(batch, dim, generator=generator))
    leaves = [column.requires_grad_() for column in columns]
    guide = [torch.randn(batch, dim // 2, generator=generator) for _ in range(2)]
    dims = matryoshka_dims(dim)
    chosen = dims if "Matryoshka" in implementation else None
    options = HARDNESS if recipe == "hardness" else {}
    module = st_losses if implementation.startswith("sentence-transformers") else losses

    class EmbeddingColumns(torch.nn.Module):
        def forward(self, features):
            return {"sentence_embedding": features["embedding"]}

        def get_embedding_dimension(self):  # asked by sentence-transformers >= 5.4
            return dim

        get_sentence_embedding_dimension = get_embedding_dimension

    model = EmbeddingColumns()
    # The GIST losses read the model's dtype from its parameters.
    model.register_parameter("unused", torch.nn.Parameter(torch.zeros(1)))
    if implementation.startswith("simcse_fast,"):
        if recipe == "gist":

            def loss():
                return functional.guided_in_batch_negatives_loss(
                    leaves[0], leaves[1], *guide, n_positives=batch, scale=1 / GIST_TEMPERATURE,
                    matryoshka_dims=chosen,
                ).mean()  # fmt: skip
        else:

            def loss():
                docs = torch.cat(leaves[1:])
                return functional.in_batch_negatives_loss(
                    leaves[0], docs, n_local=batch, scale=20.0, matryoshka_dims=chosen, **options
                ).mean()
    elif recipe == "gist":
        from simcse_fast.bench.cases import _st_gist_stage

        stage = _st_gist_stage(module, batch)
        stage.temperature, stage.model, stage.guide = GIST_TEMPERATURE, model, model
        if chosen is not None:
            stage = module.MatryoshkaLoss(model, stage, dims).loss

        def loss():
            # The GradCache loss stage runs its own backward (returning a detached loss).
            return stage.calculate_loss(
                [[leaf] for leaf in leaves], [[part] for part in guide], with_backward=True
            )
    else:
        criterion = module.MultipleNegativesRankingLoss(model, scale=20.0, **options)
        if chosen is not None:
            criterion = module.MatryoshkaLoss(model, criterion, dims)
        labels = torch.empty(0)

        def loss():
            return criterion([{"embedding": leaf} for leaf in leaves], labels)

    def step():
        for leaf in leaves:
            leaf.grad = None
        value = loss()
        if value.requires_grad:
            value.backward()

    return step


def worker(recipe: str, implementation: str, batch: int, dim: int, threads: int) -> dict:
    """Peak extra memory of one forward + backward after a warm-up, in this fresh process."""
    import torch

    from simcse_fast import bench

    torch.set_num_threads(threads)
    step = build(recipe, implementation, batch, dim)
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
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--memory-gb", type=float, default=16.0,
                        help="skip a peer whose estimated need exceeds this (default 16)")  # fmt: skip
    parser.add_argument("--out", help="directory for matryoshka.json and matryoshka.md")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.dim, args.threads)))
        return
    import sentence_transformers
    import torch

    from simcse_fast import bench

    torch.set_num_threads(args.threads)
    cases = [(recipe, name) for recipe in args.recipes for name in IMPLEMENTATIONS]
    skipped = {case: skip_reason(*case, args.batch, args.dim, args.memory_gb) for case in cases}
    steps = {case: build(*case, args.batch, args.dim) for case in cases if skipped[case] is None}
    for step in steps.values():
        step()  # warm-up
    cpu = {case: [] for case in steps}
    wall = {case: [] for case in steps}
    for round_ in range(args.rounds):
        for case, step in steps.items():
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            step()
            cpu[case].append(time.process_time() - started_cpu)
            wall[case].append(time.perf_counter() - started_wall)
        print(
            f"round {round_ + 1}: " + ", ".join(f"{r}/{n} {cpu[r, n][-1]:.2f}s" for r, n in steps), flush=True
        )
    rows = []
    for recipe, name in cases:
        if skipped[recipe, name] is not None:
            rows.append({"recipe": recipe, "impl": name, "skipped": skipped[recipe, name]})
            continue
        command = [sys.executable, __file__, "--worker", recipe, name, "--batch", str(args.batch),
                   "--dim", str(args.dim), "--threads", str(args.threads)]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        memory = json.loads(completed.stdout.strip().splitlines()[-1])
        one = (recipe, ONE_DIM)
        ratios = [time_ / base for time_, base in zip(cpu[recipe, name], cpu[one], strict=True)]
        wall_ratios = [time_ / base for time_, base in zip(wall[recipe, name], wall[one], strict=True)]
        wall_spread = percentiles(wall[recipe, name])
        rows.append({
            "recipe": recipe, "impl": name, "cpu_s": percentiles(cpu[recipe, name]), "wall_s": wall_spread,
            "cpu_ratio": statistics.median(ratios), "wall_ratio": statistics.median(wall_ratios),
            "busy": wall_spread["p80"] > bench.BUSY_SPREAD * wall_spread["p20"], **memory,
        })  # fmt: skip
    device = (
        f"cpu ({platform.machine()}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})"
    )
    dims = ", ".join(map(str, matryoshka_dims(args.dim)))
    lines = [
        f"Matryoshka loss, forward + backward: B = {args.batch} anchors, D = {args.dim}, fp32, "
        f"dimensions {dims}; {device}; torch {torch.__version__}, sentence-transformers "
        f"{sentence_transformers.__version__}; commit {bench.git_commit()}; {args.rounds} interleaved rounds",
    ]
    for recipe in args.recipes:
        lines += [
            "",
            f"{recipe}: {RECIPE_NAMES[recipe]}",
            "",
            "| implementation | CPU s, median (p20-p80) | x one dimension (CPU) | wall s, median (p20-p80) "
            "| x one dimension (wall) | peak extra MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in (row for row in rows if row["recipe"] == recipe):
            if "skipped" in row:
                lines.append(f"| {row['impl']} | skipped: {row['skipped']} | | | | |")
                continue
            c, w = row["cpu_s"], row["wall_s"]
            lines.append(
                f"| {row['impl']} | {c['median']:.2f} ({c['p20']:.2f}-{c['p80']:.2f}) "
                f"| {row['cpu_ratio']:.2f} | {w['median']:.2f} ({w['p20']:.2f}-{w['p80']:.2f}) "
                f"| {row['wall_ratio']:.2f} "
                f"| {row['peak_extra_mb']:.0f} |"
            )
    busy = [f"{row['recipe']}/{row['impl']}" for row in rows if row.get("busy")]
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
            "cpu_s": {"/".join(case): values for case, values in cpu.items()},
            "wall_s": {"/".join(case): values for case, values in wall.items()}, "rows": rows,
        }  # fmt: skip
        (out / "matryoshka.json").write_text(json.dumps(document, indent=2) + "\n")
        (out / "matryoshka.md").write_text(table)


if __name__ == "__main__":
    main()
