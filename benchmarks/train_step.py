"""One SimCSE training step at growing batch sizes: time and peak memory, cached and uncached,
beside sentence-transformers' CachedMultipleNegativesRankingLoss.

    python benchmarks/train_step.py [--sizes 64,256,1024,4096] [--mini-batch-size 128] [--out DIR]

The encoder is a small BERT built here from a config (hidden 128, 2 layers, 32 tokens per
sentence; no download) on the CPU, or on the GPU when one is present. Each case runs in a fresh
process; its peak memory is measured as ``simcse-fast bench`` does (growth of the resident
set's high-water mark on a CPU, ``max_memory_allocated`` on a GPU). Timings are of one step
after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLEMENTATIONS = ("simcse_fast uncached", "simcse_fast cached", "sentence-transformers CachedMNRL")
WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue house tree car road sun moon and by".split()
)


def build_model(folder: Path) -> None:
    import torch
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)


def sentences(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 30))) for _ in range(count)]


def worker(folder: str, implementation: str, batch: int, mini_batch_size: int) -> dict:
    import torch

    import simcse_fast as sf
    from simcse_fast import bench, training

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = sentences(batch)
    if implementation.startswith("sentence-transformers"):
        from sentence_transformers import SentenceTransformer

        from simcse_fast.sentence_transformers._compat import st_losses, st_modules

        transformer = st_modules.Transformer(folder, max_seq_length=32)
        pooling = st_modules.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(modules=[transformer, pooling], device=str(device))
        model.train()  # dropout on, as in every training step here
        loss_fn = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)

        def step():
            features = [model.preprocess(texts), model.preprocess(texts)]
            features = [
                {key: value.to(device) if torch.is_tensor(value) else value for key, value in part.items()}
                for part in features
            ]
            loss_fn(features, None).backward()
    else:
        model = sf.SimCSE(folder, max_seq_length=32, device=device)
        model.train()
        cached = implementation.endswith("cached") and not implementation.endswith("uncached")

        def loss_of(embeddings):
            rows = embeddings.shape[0] // 2
            return sf.info_nce(embeddings[:rows], embeddings[rows:], scale=20.0)

        def step():
            features = model.tokenize(texts)
            doubled = {name: torch.cat([t, t]) for name, t in features.items()}
            if cached:
                ranges = training.mini_batches(doubled["attention_mask"], mini_batch_size)
                training.cached_step(lambda f: model(f), doubled, ranges, loss_of)
            else:
                loss_of(model(doubled)).backward()

    step()  # warm-up: allocator pools and lazy initialization are not the step's
    model.zero_grad(set_to_none=True)
    measured = {}
    started = time.perf_counter()
    with bench.Device(device).peak_memory(measured):
        step()
        bench.Device(device).synchronize()
    return {
        "seconds": time.perf_counter() - started,
        "peak_extra_mb": measured["peak_mem_mb"],
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024,4096")
    parser.add_argument("--mini-batch-size", type=int, default=128)
    parser.add_argument("--out", help="directory for train_step.json and train_step.md")
    parser.add_argument(
        "--worker", nargs=4, metavar=("FOLDER", "IMPLEMENTATION", "BATCH", "MINI"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        folder, implementation, batch, mini = args.worker
        print(json.dumps(worker(folder, implementation, int(batch), int(mini))))
        return
    import torch

    from simcse_fast import bench

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        build_model(Path(folder))
        for batch in (int(size) for size in args.sizes.split(",")):
            for implementation in IMPLEMENTATIONS:
                command = [sys.executable, __file__, "--worker", folder, implementation, str(batch),
                           str(args.mini_batch_size)]  # fmt: skip
                completed = subprocess.run(command, capture_output=True, text=True)
                if completed.returncode != 0:
                    out_of_memory = "out of memory" in completed.stderr.lower()
                    status = "oom" if out_of_memory else "error"
                    detail = completed.stderr.strip().splitlines()[-1:]
                    rows.append({"batch": batch, "impl": implementation, "status": status, "detail": detail})
                else:
                    rows.append({"batch": batch, "impl": implementation, "status": "ok",
                                 **json.loads(completed.stdout.strip().splitlines()[-1])})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"One SimCSE step, BERT hidden 128 x 2 layers, 32 tokens, mini-batches of "
        f"{args.mini_batch_size} rows (cached); {name}; torch {torch.__version__}; "
        f"commit {bench.git_commit()}",
        "",
        "| batch | implementation | seconds | peak extra MB |",
        "| ---: | --- | ---: | ---: |",
    ]
    for row in rows:
        if row["status"] == "ok":
            lines.append(
                f"| {row['batch']} | {row['impl']} | {row['seconds']:.2f} | {row['peak_extra_mb']:.0f} |"
            )
        else:
            lines.append(f"| {row['batch']} | {row['impl']} | {row['status']} | |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        document = {"device": name, "torch": torch.__version__, "commit": bench.git_commit(),
                    "mini_batch_size": args.mini_batch_size}  # fmt: skip
        (out / "train_step.json").write_text(json.dumps({**document, "rows": rows}, indent=2) + "\n")
        (out / "train_step.md").write_text(table)


if __name__ == "__main__":
    main()
