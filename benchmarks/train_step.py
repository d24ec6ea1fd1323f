"""One contrastive training step, end to end: ``simcse-fast train``'s step (uncached and with
gradient caching) beside sentence-transformers' ``fit`` step with MultipleNegativesRankingLoss
and CachedMultipleNegativesRankingLoss: step time (p20/p50/p80), sentences/s and peak memory.

    python benchmarks/train_step.py [--encoder tiny-bert] [--sizes 64,256,1024,4096]
                                    [--mini-batch-size 128] [--implementations NAME,...] [--out DIR]

The encoder is built here from a config with random weights (no download): ``tiny-bert``
(BERT, hidden 128, 2 layers) or ``distilroberta`` (RoBERTa, hidden 768, 6 layers, 12 heads,
the size of distilroberta-base), with a word-level vocabulary; every sentence fills 32 tokens.
It runs on the GPU when one is present (bf16 autocast, as ``simcse-fast train`` and ``fit``
with ``bf16`` do), else on the CPU. Each case runs in a fresh process; its peak memory is
measured as ``simcse-fast bench`` does (growth of the resident set's high-water mark on a CPU,
``max_memory_allocated`` on a GPU) over the model and optimizer state that a warm-up step
leaves. The GPU check (``benchmarks/gpu_check.py``) measures every implementation listed in
``IMPLEMENTATIONS`` through :func:`measure` and :func:`largest_batch`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue house tree car road sun moon and by".split()
)
SEQUENCE_LENGTH = 32
"""Tokens per sentence: each sentence has more words than this, and is truncated to it."""

ENCODERS = {
    "tiny-bert": {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 512, "max_position_embeddings": 64},
    "distilroberta": {"model_type": "roberta", "hidden_size": 768, "num_hidden_layers": 6,
                      "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
                      "vocab_size": 50265, "type_vocab_size": 1},
}  # fmt: skip
"""Encoder configurations by name (Hugging Face config fields; the vocabulary size defaults to
the word vocabulary's). ``distilroberta`` has distilroberta-base's shape and embedding table."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How one implementation's step is set up: ``setup(folder, texts, device, options)`` loads
    its model from ``folder`` and returns a :class:`Stepper` that trains on ``texts`` with
    ``options``: for ``simcse-fast train``, fields of ``training.TrainingConfig`` (its command
    options, ``mini_batch_size`` ...); for sentence-transformers, the loss and its mini-batch
    size."""

    setup: Callable[..., Stepper]
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stepper:
    """A ready training step: ``run(steps)`` trains ``steps`` steps and returns the seconds of
    each (the device synchronized at each end); ``measured_steps(steps, result)`` does the same
    and puts the peak extra memory of those steps in ``result["peak_mem_mb"]`` (and on a GPU
    the memory held before them in ``result["held_mb"]``)."""

    run: Callable[[int], list[float]]
    measured_steps: Callable[[int, dict], list[float]]


def build_model(folder: Path, encoder: str = "tiny-bert") -> None:
    """Writes a randomly initialized encoder of ``ENCODERS[encoder]``'s shape and a word-level
    tokenizer for it to ``folder`` (a Hugging Face model folder)."""
    import torch
    import transformers

    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    fields = {"vocab_size": len(vocab), **ENCODERS[encoder]}
    model_type = fields.pop("model_type")
    # The tokenizer's ids: padding 0 (RoBERTa's position ids count from the padding id).
    config = transformers.AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                               **fields)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)


def sentences(count: int) -> list[str]:
    """``count`` random sentences, each longer than ``SEQUENCE_LENGTH`` tokens."""
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=SEQUENCE_LENGTH + 8)) for _ in range(count)]


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device) -> Callable[[int], list[float]]:
    """``run(steps)``: the seconds of each of ``steps`` calls of ``step``, device synchronized."""

    def run(steps: int) -> list[float]:
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
        return seconds

    return run


def _measured(run: Callable[[int], list[float]], device) -> Callable[[int, dict], list[float]]:
    """``measured_steps(steps, result)``: ``run(steps)`` with the peak extra memory of those
    steps in ``result["peak_mem_mb"]`` and the memory held before them in ``result["held_mb"]``."""
    import torch

    from simcse_fast import bench

    def measured_steps(steps: int, result: dict) -> list[float]:
        with bench.Device(device).peak_memory(result):
            if device.type == "cuda":
                result["held_mb"] = torch.cuda.memory_allocated(device) / 2**20
            seconds = run(steps)
        return seconds

    return measured_steps


def simcse_fast_step(folder: str, texts: list[str], device, options: dict) -> Stepper:
    """``simcse-fast train``'s step on ``texts``: tokenize, encode the 2B rows (two dropout views)
    under bf16 autocast on a GPU, the fused loss at the command's temperature, backward (with
    gradient caching when ``options["mini_batch_size"]`` is given), gradient clipping, AdamW
    and its schedule, the loss read back as the progress bar does. Settings are the command's
    defaults (``training.TrainingConfig``)."""
    import torch

    import simcse_fast as sf
    from simcse_fast import functional, training

    config = training.TrainingConfig(sentences="", output="", model=folder, batch_size=len(texts),
                                     max_seq_length=SEQUENCE_LENGTH, **options)  # fmt: skip
    config.validate()
    torch.manual_seed(config.seed)
    model = sf.SimCSE(folder, pooling=config.pooling, max_seq_length=config.max_seq_length,
                      mlp_head=config.mlp_head, backend=config.backend, device=device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    use_bf16 = model.device.type == "cuda" and torch.cuda.is_bf16_supported()
    model.train()

    def encode(features):
        with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(features, use_mlp_head=True)

    def loss_fn(embeddings):
        rows = embeddings.shape[0] // 2
        return functional.info_nce(embeddings[:rows], embeddings[rows:], scale=1.0 / config.temperature,
                                   backend=config.backend)  # fmt: skip

    def step():
        features = model.tokenize(texts)
        doubled = {name: torch.cat([tensor, tensor]) for name, tensor in features.items()}
        if config.mini_batch_size is not None or config.mini_batch_tokens is not None:
            ranges = training.mini_batches(doubled["attention_mask"], config.mini_batch_size,
                                           config.mini_batch_tokens)  # fmt: skip
            loss = training.cached_step(encode, doubled, ranges, loss_fn)
        else:
            loss = loss_fn(encode(doubled))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.detach().item()

    run = _timed(step, model.device)
    return Stepper(run, _measured(run, model.device))


def sentence_transformers_fit(folder: str, texts: list[str], device, options: dict) -> Stepper:
    """sentence-transformers' ``fit`` step (its ``SentenceTransformerTrainer``, which ``fit``
    runs) on (sentence, sentence) pairs, as unsupervised SimCSE is trained there: the loss
    ``options["loss"]`` (``MultipleNegativesRankingLoss`` or ``CachedMultipleNegativesRankingLoss``
    with ``options["mini_batch_size"]``) at its default scale 20 (temperature 0.05), mean
    pooling, bf16 on a GPU, the trainer's defaults otherwise. A step's time is the wall time
    between the ends of consecutive steps: the trainer's data loading and collation included,
    as in ``simcse-fast train``'s step."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    from simcse_fast import bench
    from simcse_fast.sentence_transformers._compat import st_losses, st_modules

    transformer = st_modules.Transformer(folder, max_seq_length=SEQUENCE_LENGTH)
    pooling = st_modules.Pooling(transformer.auto_model.config.hidden_size, pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device=str(device))
    loss_class = getattr(st_losses, options["loss"])
    extra = {"mini_batch_size": options["mini_batch_size"]} if "mini_batch_size" in options else {}
    loss = loss_class(model, **extra)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    bench_device = bench.Device(device)
    work = tempfile.TemporaryDirectory()

    class StepClock(TrainerCallback):
        """Step ends, the device synchronized; a memory measurement from a given step end on."""

        def __init__(self):
            self.ends: list[float] = []
            self.memory_from: int | None = None
            self.memory = contextlib.ExitStack()
            self.result: dict = {}

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
            self.ends.append(time.perf_counter())
            if self.memory_from == len(self.ends):
                self.memory.enter_context(bench_device.peak_memory(self.result))
                if device.type == "cuda":
                    self.result["held_mb"] = torch.cuda.memory_allocated(device) / 2**20

    def train(steps: int, clock: StepClock) -> list[float]:
        # One step more than timed: a step's time is measured from the end of the one before.
        dataset = Dataset.from_dict({"anchor": texts * (steps + 1), "positive": texts * (steps + 1)})
        arguments = SentenceTransformerTrainingArguments(
            output_dir=work.name, per_device_train_batch_size=len(texts), max_steps=steps + 1,
            bf16=use_bf16, use_cpu=device.type != "cuda", report_to=[], save_strategy="no",
            disable_tqdm=True, dataloader_drop_last=True, seed=0,
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=dataset, loss=loss,
                                             callbacks=[clock])  # fmt: skip
        trainer.train()
        clock.memory.close()
        return [end - start for start, end in zip(clock.ends, clock.ends[1:], strict=False)]

    def run(steps: int) -> list[float]:
        return train(steps, StepClock())

    def measured_steps(steps: int, result: dict) -> list[float]:
        clock = StepClock()
        clock.memory_from, clock.result = 1, result
        return train(steps, clock)

    return Stepper(run, measured_steps)


IMPLEMENTATIONS = {
    "simcse_fast uncached": Implementation(simcse_fast_step),
    "simcse_fast cached": Implementation(simcse_fast_step, {"mini_batch_size": 128}),
    "sentence-transformers fit MNRL": Implementation(
        sentence_transformers_fit, {"loss": "MultipleNegativesRankingLoss"}
    ),
    "sentence-transformers fit CachedMNRL": Implementation(
        sentence_transformers_fit, {"loss": "CachedMultipleNegativesRankingLoss", "mini_batch_size": 128}
    ),
}
"""Every implementation measured, by name: a training option added to ``simcse-fast train``
gets an entry here (its step honours it) and the GPU check measures it too."""

CACHED = "simcse_fast cached"
"""The implementation whose largest batch the GPU check searches."""


def _options(name: str, mini_batch_size: int | None) -> dict:
    """The implementation's options, its mini-batch size replaced by ``mini_batch_size``."""
    options = dict(IMPLEMENTATIONS[name].options)
    if mini_batch_size is not None and "mini_batch_size" in options:
        options["mini_batch_size"] = mini_batch_size
    return options


def measure(folder: str, name: str, batch: int, *, mini_batch_size: int | None = None, repeats: int = 3,
            device=None) -> dict:  # fmt: skip
    """One warm-up step, then ``repeats`` measured steps of implementation ``name`` at ``batch``
    sentences: the p20/p50/p80 of their seconds, sentences/s at the median and the peak extra
    memory over what the warm-up left (model, optimizer state). A step that runs out of memory
    gives ``status`` ``"oom"``."""
    import torch

    from simcse_fast import bench

    if name not in IMPLEMENTATIONS:
        raise ValueError(f"name must be one of {', '.join(IMPLEMENTATIONS)}; got {name!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = _options(name, mini_batch_size)
    row = {"impl": name, "batch": batch, "options": options, "device": str(device)}
    try:
        stepper = IMPLEMENTATIONS[name].setup(folder, sentences(batch), device, options)
        stepper.run(1)
        memory: dict = {}
        seconds = stepper.measured_steps(repeats, memory)
    except Exception as error:
        if not bench.is_out_of_memory(error):
            raise
        return row | {"status": "oom", "detail": str(error).splitlines()[0][:200]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stats = bench.spread(seconds)
    return row | {
        "status": "ok",
        "seconds": stats,
        "sentences_per_s": batch / stats["p50"],
        "peak_extra_mb": memory["peak_mem_mb"],
        "held_mb": memory.get("held_mb"),
    }


def largest_batch(folder: str, name: str, start: int, deadline: float, *, limit: int = 2**17,
                  mini_batch_size: int | None = None, device=None, on_try=None) -> dict:  # fmt: skip
    """The largest batch at which implementation ``name`` trains, searched by doubling from
    ``start`` until a step runs out of memory, the batch reaches ``limit`` or the next try
    (estimated: twice the last one's time) would end after ``deadline`` (``time.time()``).
    Returns the largest batch that ran, why the search stopped and each try; ``on_try`` is
    called with that result, so far, after each try."""
    unfinished = "not finished (stopped from outside)"
    search = {"impl": name, "largest": None, "stopped_by": unfinished, "tries": []}
    batch = start
    while True:
        started = time.time()
        row = measure(folder, name, batch, mini_batch_size=mini_batch_size, repeats=1, device=device)
        row["wall_s"] = time.time() - started
        search["tries"].append(row)
        if row["status"] != "ok":
            search["stopped_by"] = f"out of memory at batch {batch}"
        elif batch * 2 > limit:
            search["largest"], search["stopped_by"] = batch, f"the search stops at batch {limit}"
        elif time.time() + 2 * row["wall_s"] > deadline:
            search["largest"] = batch
            search["stopped_by"] = (
                f"time: the next try (batch {2 * batch}, ~{2 * row['wall_s']:.0f} s) would end late"
            )
        else:
            search["largest"] = batch
        if on_try is not None:
            on_try(search)
        if search["stopped_by"] != unfinished:
            return search
        batch *= 2


def table(rows: list[dict]) -> list[str]:
    """Rows of :func:`measure` as markdown table lines: time, sentences/s, peak extra memory and,
    on a GPU, the memory held between steps."""
    lines = [
        "| batch | implementation | median s | p20-p80 s | sentences/s | peak extra MB | held MB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        head = f"| {row['batch']} | {row['impl']} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']} | | | | |")
            continue
        seconds = row["seconds"]
        held = "" if row.get("held_mb") is None else f"{row['held_mb']:.0f}"
        lines.append(
            f"{head} {seconds['p50']:.3f} | {seconds['p20']:.3f}-{seconds['p80']:.3f} | "
            f"{row['sentences_per_s']:.0f} | {row['peak_extra_mb']:.0f} | {held} |"
        )
    return lines


def _markdown(document: dict) -> str:
    """A run as markdown: what and where, then the table."""
    head = (
        f"One training step, encoder {document['encoder']} ({SEQUENCE_LENGTH} tokens a sentence), "
        f"mini-batches of {document['mini_batch_size']} where cached; {document['device']}; torch "
        f"{document['torch']}; commit {document['commit']}"
    )
    return "\n".join([head, "", *table(document["rows"])]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tiny-bert", choices=sorted(ENCODERS))
    parser.add_argument("--sizes", default="64,256,1024,4096", help="batch sizes, comma-separated")
    parser.add_argument("--mini-batch-size", type=int, default=128, help="rows per mini-batch, cached")
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per case")
    parser.add_argument(
        "--implementations", default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated, among: {', '.join(IMPLEMENTATIONS)}",
    )  # fmt: skip
    parser.add_argument("--out", help="directory for train_step.json and train_step.md")
    parser.add_argument(
        "--worker", nargs=4, metavar=("FOLDER", "NAME", "BATCH", "MINI"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        folder, name, batch, mini = args.worker
        print(json.dumps(measure(folder, name, int(batch), mini_batch_size=int(mini), repeats=args.repeats)))
        return
    names = [name.strip() for name in args.implementations.split(",") if name.strip()]
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown or not names:
        choices = ", ".join(IMPLEMENTATIONS)
        parser.error(f"--implementations takes names among {choices}; got {unknown or names}")
    import torch

    from simcse_fast import bench

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        build_model(Path(folder), args.encoder)
        for batch in (int(size) for size in args.sizes.split(",")):
            for name in names:
                command = [sys.executable, __file__, "--repeats", str(args.repeats), "--worker", folder, name,
                           str(batch), str(args.mini_batch_size)]  # fmt: skip
                completed = subprocess.run(command, capture_output=True, text=True)
                if completed.returncode != 0:
                    detail = completed.stderr.strip().splitlines()[-1:]
                    rows.append({"batch": batch, "impl": name, "status": "error", "detail": detail})
                else:
                    rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    device = bench.Device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    document = {
        "encoder": args.encoder, "device": device.name(), "torch": torch.__version__,
        "commit": bench.git_commit(), "mini_batch_size": args.mini_batch_size, "rows": rows,
    }  # fmt: skip
    table = _markdown(document)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_step.json").write_text(json.dumps(document, indent=2) + "\n")
        (out / "train_step.md").write_text(table)


if __name__ == "__main__":
    main()
