"""Unsupervised SimCSE training: one sentence per line in, a sentence-transformers folder out.

Each batch of B sentences is tokenized once and encoded as 2B rows (the batch twice), so that
dropout gives the two views in one forward pass (the official SimCSE trick); row ``i`` and row
``B + i`` are positives, every other row of the second half is a negative:
``loss = info_nce(z[:B], z[B:], scale=1 / temperature)``, pooled and scored by the fused ops.
AdamW (fused) with linear warm-up and decay, gradient clipping, bf16 autocast on GPUs that
support it, PyTorch's scaled-dot-product attention where the encoder has it.

The device never waits for the host: batches are tokenized ahead in a background thread
(:mod:`simcse_fast.batching`) and a step (:class:`StepRunner`) reads nothing back; the loss is
summed on the device and read every ``log_steps`` steps and at checkpoints (:class:`_Progress`),
which is also where the speed (sentences per second, the share of the steps' time outside the
encoder) is measured. ``compile`` runs the encoder under ``torch.compile``, ``packed`` feeds it
unpadded batches through a varlen attention.

Checkpoints (every ``checkpoint_steps``, in ``OUTPUT/checkpoints/step-N``) hold the model,
optimizer, scheduler and its schedule, every random state, the data position and the last loss;
``resume=True`` continues from the latest, and the run then ends with the same weights as an
uninterrupted one. A larger ``epochs`` or ``max_steps`` on resume extends the run
(:func:`resumed_schedule`). The data order of epoch ``e`` is a permutation seeded by
``seed + e``, so the position is (epoch, batch). Nothing is written to ``OUTPUT`` until the data
and the model have loaded. With ``dev_sts`` the starting model (step 0) and each checkpoint are
evaluated at the sequence length the saved models keep, the best in ``OUTPUT/best``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import functional
from .batching import Batch, Prefetcher, Tokenization, batch_plan, rows_of
from .batching import mini_batches as mini_batches  # its home before simcse_fast.batching
from .config import PACKED_ATTENTION, TRAINING_MAX_SEQ_LENGTH, TrainingConfig, packed_attention_missing
from .encoder import SimCSE, quiet_transformers
from .evaluation import evaluate_sts, read_sts_pairs

CHECKPOINT_FILE = "training_state.pt"
RUN_FILE = "simcse_fast_run.json"
"""Written into the output folder when a run starts: its settings and data, so that another run
is never mixed into it and ``--resume`` can check what it continues."""
DEV_SCORES_FILE = "dev_scores.json"
RESULT_SETTINGS = (
    "model", "batch_size", "max_seq_length", "pooling", "epochs", "max_steps", "lr", "temperature",
    "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "min_chars", "mlp_head", "mini_batch_size",
    "mini_batch_tokens",
)  # fmt: skip
"""The settings that change the trained weights (with the data): ``--resume`` must match them,
except ``EXTENSIBLE_SETTINGS``."""
EXTENSIBLE_SETTINGS = ("epochs", "max_steps")
"""What ``--resume`` may change: the run's length. A longer run continues from the checkpoint
with the learning-rate rule of :func:`resumed_schedule`; a shorter one is refused."""


class TrainingDataError(ValueError):
    """A sentences file that is missing, unreadable or has too few usable lines."""


def read_sentences(path: str | Path, min_chars: int = 10) -> list[str]:
    """Stripped lines of a text file (``.gz`` too) with at least ``min_chars`` characters."""
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            sentences = [line.strip() for line in handle]
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingDataError(f"{path}: cannot read ({error})") from error
    kept = [sentence for sentence in sentences if len(sentence) >= min_chars]
    if len(kept) < 2:
        raise TrainingDataError(
            f"{path}: {len(kept)} usable line(s) of {len(sentences)} (lines shorter than {min_chars} "
            "characters are skipped); training needs at least 2"
        )
    return kept


def planned_steps(epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    """A run's length in optimizer steps: ``epochs`` passes over the data, at most ``max_steps``."""
    total = epochs * steps_per_epoch
    return total if max_steps is None else min(total, max_steps)


def _linear_schedule(warmup_steps: int, total_steps: int, restart_step: int = 0):
    """The learning-rate factor of each step: linear warm-up over ``warmup_steps``, then linear
    decay from 1 to 0 at ``total_steps``, starting at the later of the warm-up's end and
    ``restart_step`` (where an extended run restarts its decay: :func:`resumed_schedule`)."""
    decay_start = max(warmup_steps, restart_step)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))

    return factor


def new_schedule(warmup_ratio: float, total_steps: int) -> dict:
    """The learning-rate schedule of a new run (the arguments of ``_linear_schedule``)."""
    warmup_steps = int(warmup_ratio * total_steps)
    return {"warmup_steps": warmup_steps, "total_steps": total_steps, "restart_step": 0}


def resumed_schedule(saved: dict, step: int, total_steps: int, output: Path) -> dict:
    """The schedule of a run resumed at ``step``, which the saved schedule ``saved`` planned for
    ``saved["total_steps"]`` steps. Unchanged when the run keeps its length (the resumed run then
    ends with an uninterrupted run's weights). A longer run (a larger ``--max-steps`` or
    ``--epochs``) restarts its decay at ``step``: the learning rate goes back to ``--lr`` there (no
    second warm-up; an unfinished one completes first) and decays linearly to 0 at the new total.
    A shorter run is refused (``ValueError``)."""
    planned = saved["total_steps"]
    if total_steps == planned:
        return saved
    if total_steps < planned:
        raise ValueError(
            f"--resume: the run in {output} is planned for {planned} steps and has done {step}; --epochs "
            f"and --max-steps give {total_steps} now. Resume with settings that give at least {planned} "
            "steps (more extend the run)"
        )
    return {"warmup_steps": saved["warmup_steps"], "total_steps": total_steps, "restart_step": step}


def _random_states() -> dict:
    """Every random generator's state as tensors and plain types, which ``torch.load(...,
    weights_only=True)`` reads back. The global generators, legacy numpy one included: they are
    what libraries draw from."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()  # noqa: NPY002
    states = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gauss": cached_gauss},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict) -> None:
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state(  # noqa: NPY002
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
         numpy["cached_gauss"])
    )  # fmt: skip
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def data_identity(path: str | Path) -> dict:
    """What identifies a sentences file: resolved path, size and the SHA-256 of its first and last
    MiB (a sample: hashing a 10 GB corpus at every start would take minutes)."""
    path = Path(path).resolve()
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(size - (1 << 20))
            digest.update(handle.read())
    return {"path": str(path), "size": size, "sample_sha256": digest.hexdigest()}


def run_identity(config: TrainingConfig) -> dict:
    """The settings and data that determine a run's result (``RESULT_SETTINGS``)."""
    return {"settings": {name: getattr(config, name) for name in RESULT_SETTINGS},
            "data": data_identity(config.sentences)}  # fmt: skip


def _differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two run identities, except the settings ``ignore``."""
    found = []
    for name in RESULT_SETTINGS:
        before, now = saved["settings"].get(name), current["settings"][name]
        if before != now and name not in ignore:
            found.append(f"{name} ({before!r} there, {now!r} now)")
    data_before, data_now = saved["data"], current["data"]
    if data_before["path"] != data_now["path"]:
        found.append(f"sentences file ({data_before['path']} there, {data_now['path']} now)")
    elif data_before["size"] != data_now["size"] or data_before["sample_sha256"] != data_now["sample_sha256"]:
        found.append(f"sentences file content ({data_before['size']} bytes there, {data_now['size']} now, "
                     "or another sample hash)")  # fmt: skip
    return found


def _read_run_file(output: Path) -> dict | None:
    try:
        return json.loads((output / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomically(path: Path, value) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)


def check_output(config: TrainingConfig, checkpoint: Path | None) -> bool:
    """Refuse to mix runs in one folder; writes nothing (:func:`record_run` does, once the run
    can start). A new run needs an empty (or missing) ``output``, or ``overwrite`` and a folder
    that holds a simcse-fast run (never a folder of something else). A resumed run must have the
    settings and data of the run it continues, except its length (``EXTENSIBLE_SETTINGS``).
    Raises ``ValueError`` naming each difference; returns whether the folder holds a run that
    the new one replaces: with ``overwrite``, or with ``resume="auto"`` a run of the same settings
    that stopped before its first checkpoint (there is nothing to continue)."""
    output = Path(config.output)
    current = run_identity(config)
    saved = _read_run_file(output)
    if checkpoint is not None:
        differences = _differences(saved, current, EXTENSIBLE_SETTINGS) if saved is not None else []
        if differences:
            raise ValueError(
                f"--resume: {output} holds a run with other settings or data: {'; '.join(differences)}. "
                "Resume with the same ones, or start a new run with --overwrite or another --output"
            )
        return False
    if not (output.exists() and any(output.iterdir())):
        return False
    has_checkpoint = latest_checkpoint(output) is not None
    if config.overwrite:
        if saved is not None or has_checkpoint:
            return True
        raise ValueError(
            f"--overwrite: {output} is not empty and holds no simcse-fast run (no {RUN_FILE}); "
            "refusing to delete it: choose another --output"
        )
    differences = _differences(saved, current) if saved is not None else None
    if differences:
        what = "another run (" + "; ".join(differences) + ")"
    elif saved is None:
        what = "files of something else"
    elif not has_checkpoint:
        if config.resume == "auto":
            return True
        raise ValueError(
            f"{output} holds a run with these settings that stopped before its first checkpoint: start "
            "it over with --resume=auto or --overwrite, or choose another --output"
        )
    else:
        what = "a run with these settings"
    raise ValueError(
        f"{output} holds {what}: continue it with --resume, replace it with --overwrite, "
        "or choose another --output"
    )


def record_run(config: TrainingConfig, replace: bool) -> None:
    """Record the run in its output folder (its settings and data, ``RUN_FILE``), deleting the
    run it replaces first (``replace``, from :func:`check_output`)."""
    output = Path(config.output)
    if replace:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(output / RUN_FILE, run_identity(config))


def latest_checkpoint(output: str | Path) -> Path | None:
    folders = sorted(
        (p for p in (Path(output) / "checkpoints").glob("step-*") if (p / CHECKPOINT_FILE).is_file()),
        key=lambda p: int(p.name.removeprefix("step-")),
    )
    return folders[-1] if folders else None


def _save_checkpoint(folder: Path, state: dict, keep: int) -> None:
    """Write ``state`` to ``folder`` atomically (a temporary folder renamed into place) and
    keep only the ``keep`` most recent checkpoints."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(state, partial / CHECKPOINT_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    checkpoints = sorted(
        folder.parent.glob("step-*"), key=lambda p: int(p.name.removeprefix("step-").split(".")[0])
    )
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_step(encode, features: dict, ranges: list[slice], loss_fn, *, no_sync=None) -> torch.Tensor:
    """One step with gradient caching (GradCache): returns the loss, detached, after
    accumulating the parameters' gradients.

    (1) ``encode`` each row range of ``features`` without autograd, saving the random state
    before each (dropout replays exactly); (2) ``loss_fn`` on all the embeddings, backward to
    the embeddings only; (3) re-encode each range from its saved state and backpropagate its
    slice of the embedding gradient. Activation memory is that of one range; the loss sees the
    whole batch. ``no_sync``: a DistributedDataParallel model's ``no_sync``, so that gradients
    are all-reduced once, after the last range. Each range is cut to its longest row, which reads
    the mask (a synchronization on a GPU): the training command cuts its mini-batches on the host
    beforehand and calls :func:`cached_parts_step`.
    """
    parts = [rows_of(features, rows) for rows in ranges]
    counts = [rows.stop - rows.start for rows in ranges]
    return cached_parts_step(encode, parts, counts, loss_fn, no_sync=no_sync)


def cached_parts_step(encode, parts: list[dict], rows: list[int], loss_fn, *, no_sync=None) -> torch.Tensor:
    """:func:`cached_step` on a batch already cut into ``parts`` (features of ``rows[i]`` rows
    each, padded or packed: ``simcse_fast.batching``)."""
    device = parts[0]["input_ids"].device
    states, pieces = [], []
    with torch.no_grad():
        for part in parts:
            states.append(_rng_state(device))
            pieces.append(encode(part))
    embeddings = torch.cat(pieces).requires_grad_()
    loss = loss_fn(embeddings)
    loss.backward()
    start = 0
    for index, (part, count, state) in enumerate(zip(parts, rows, states, strict=True)):
        _set_rng_state(state, device)
        last = index == len(parts) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            encode(part).backward(embeddings.grad[start : start + count])
        start += count
    return loss.detach()


def new_optimizer(model: SimCSE, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters: PyTorch's fused implementation (one kernel for every
    parameter, the step counters on the device, so a step reads nothing back) where it has one
    for the device (CUDA and CPU among them), else the multi-tensor (foreach) one."""
    options = {"lr": config.lr, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **options)
    except RuntimeError:
        return torch.optim.AdamW(model.parameters(), foreach=True, **options)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer ``state``, keeping this optimizer's implementation (a
    state dict's groups carry the flags of the one that saved it)."""
    flags = ("fused", "foreach")
    groups = [
        {**saved, **{flag: group.get(flag) for flag in flags}}
        for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


COMPILE_BACKEND = "inductor"
"""The ``torch.compile`` backend of ``compile=True``."""


class _CompiledEncoder:
    """``encoder`` under ``torch.compile``, counting the graphs it compiles (a step that compiled
    is timed apart). Rows may vary (the last batch of an epoch, mini-batches, processes' shares)
    without a recompile; widths are padded to a few buckets (``simcse_fast.batching``) and each
    compiles once. ``eager_random``: dropout drawn by PyTorch's own random ops (Inductor's
    ``fallback_random``): so that gradient caching's replay with autograd draws the masks of the
    first pass without it (Inductor's generator could number them differently in the two
    graphs), and on a CPU, where Inductor's generated random numbers take about 4x the time of
    PyTorch's ``bernoulli_`` (all-MiniLM-L6-v2's training step: 0.41 s against 0.10 s)."""

    def __init__(self, encoder: torch.nn.Module, *, eager_random: bool = False):
        self.graphs = 0
        compile_graph = torch._dynamo.lookup_backend(COMPILE_BACKEND)

        def counting(graph, example_inputs):
            self.graphs += 1
            return compile_graph(graph, example_inputs)

        self._compiled = torch.compile(encoder, backend=counting)
        self._eager_random = eager_random

    def __call__(self, **features):
        for value in features.values():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                torch._dynamo.maybe_mark_dynamic(value, 0)
                torch._dynamo.mark_static(value, 1)
        if not self._eager_random:
            return self._compiled(**features)
        from torch._inductor import config as inductor_config

        with inductor_config.patch(fallback_random=True):
            return self._compiled(**features)


_MARKS = ("step_start", "step_end", "forward_start", "forward_end", "backward_start", "backward_end")


class _EncoderClock:
    """When the encoder ran (forward and backward) and when steps ended, for the share of a step
    spent outside the encoder: CUDA events on a GPU (recorded in stream order, read only where
    the loss is read, after a synchronization), the host clock on a CPU (which computes
    synchronously). The encoder's backward runs from its output's gradient to its input
    embeddings' gradient (the last of its parameters that autograd reaches)."""

    def __init__(self, model: SimCSE):
        self.cuda = model.device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._steps: list[list[tuple[str, object]]] = []
        self._last_end = None
        weight = model.encoder.get_input_embeddings().weight
        self._hook = weight.register_post_accumulate_grad_hook(lambda _: self._mark("backward_end"))

    def _mark(self, kind: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((kind, event))
        else:
            self._marks.append((kind, time.perf_counter()))

    def timed(self, encoder):
        """``encoder``, its forward and backward marked."""

        def run(**features):
            self._mark("forward_start")
            output = encoder(**features)
            self._mark("forward_end")
            hidden = output.last_hidden_state
            if hidden.requires_grad:
                hidden.register_hook(lambda _: self._mark("backward_start"))
            return output

        return run

    def start_step(self) -> None:
        self._marks = []
        self._mark("step_start")

    def end_step(self, kept: bool = True) -> None:
        """End a step; one not ``kept`` (it compiled) counts in no share."""
        self._mark("step_end")
        self._steps.append(self._marks if kept else [])

    def _seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start

    def read(self) -> tuple[float, float]:
        """``(encoder seconds, step seconds)`` of the steps since the last read. A step's time
        runs from the end of the step before it (when that one counts) to its end, so that the
        device's idle time between steps counts outside the encoder."""
        encoder = total = 0.0
        for marks in self._steps:
            if not marks:
                self._last_end = None
                continue
            times = {kind: [at for name, at in marks if name == kind] for kind in _MARKS}
            pairs = [("forward_start", "forward_end"), ("backward_start", "backward_end")]
            if any(len(times[start]) != len(times[end]) for start, end in pairs):
                self._last_end = None
                continue  # a step whose marks do not pair up (a backward outside the encoder)
            begin = self._last_end if self._last_end is not None else times["step_start"][0]
            total += self._seconds(begin, times["step_end"][0])
            for start, end in pairs:
                encoder += sum(self._seconds(a, b) for a, b in zip(times[start], times[end], strict=True))
            self._last_end = times["step_end"][0]
        self._steps = []
        return encoder, total

    def pause(self) -> None:
        """Forget the last step's end: what runs next (a checkpoint, an evaluation) is no step."""
        self._last_end = None

    def close(self) -> None:
        self._hook.remove()


class StepRunner:
    """``simcse-fast train``'s step on a :class:`~simcse_fast.batching.Batch` (on the device):
    encode the 2B rows (two dropout views) under bf16 autocast on GPUs that support it, through
    ``torch.compile`` with ``config.compile``; the fused loss (row ``i`` and row ``B + i`` are
    positives); backward (gradient caching over the batch's parts when it has several);
    gradient clipping; ``optimizer`` and ``scheduler`` steps. Returns the loss, detached, on the
    device: nothing is read back to the host. ``world`` > 1: under DistributedDataParallel,
    negatives gathered from every process."""

    def __init__(self, model: SimCSE, optimizer, scheduler, config: TrainingConfig, *, world: int = 1):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config, self.world = config, world
        self.use_bf16 = model.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.network = model
        if world > 1:
            # The encoder's pooler (and an unused MLP head) take no part in the loss.
            self.network = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        caching = config.mini_batch_size is not None or config.mini_batch_tokens is not None
        eager_random = caching or model.device.type == "cpu"
        self.compiled = _CompiledEncoder(model.encoder, eager_random=eager_random) if config.compile else None
        self.clock = _EncoderClock(model)
        self._encoder = self.clock.timed(self.compiled or model.encoder)

    @property
    def compiled_graphs(self) -> int:
        """Graphs compiled so far (0 without ``compile``)."""
        return 0 if self.compiled is None else self.compiled.graphs

    def encode(self, features: dict) -> torch.Tensor:
        with torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            return self.network(features, use_mlp_head=True, encoder=self._encoder)

    def loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Row i and row B + i (the two dropout views of sentence i) are positives."""
        rows = embeddings.shape[0] // 2
        return functional.info_nce(
            embeddings[:rows], embeddings[rows:], scale=1.0 / self.config.temperature,
            backend=self.config.backend, gather_across_devices=self.world > 1,
        )  # fmt: skip

    def __call__(self, batch: Batch) -> torch.Tensor:
        if len(batch.parts) > 1:
            no_sync = self.network.no_sync if self.world > 1 else None
            loss = cached_parts_step(self.encode, batch.parts, batch.rows, self.loss, no_sync=no_sync)
        else:
            loss = self.loss(self.encode(batch.parts[0]))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        self.clock.close()


def tokenization(model: SimCSE, config: TrainingConfig) -> Tokenization:
    """How ``simcse-fast train`` turns a batch's sentences into the step's input for ``model``
    (truncated at its ``max_seq_length``), as ``config`` asks: padded to the longest row, or to
    a few widths with ``compile``, or packed with ``packed``, cut into mini-batches for gradient
    caching, pinned for a GPU."""
    # Encoders whose embeddings number positions from the padding id (RoBERTa, XLM-R) say so.
    padding_idx = getattr(getattr(model.encoder, "embeddings", None), "padding_idx", None)
    return Tokenization(
        model.tokenizer, model.max_seq_length, static_widths=config.compile, packed=config.packed,
        position_offset=0 if padding_idx is None else padding_idx + 1, pin=model.device.type == "cuda",
        mini_batch_size=config.mini_batch_size, mini_batch_tokens=config.mini_batch_tokens,
    )  # fmt: skip


class _Progress:
    """What the bar and the summary report, read from the device only every ``log_steps`` steps
    and where a checkpoint is written (one synchronization there, none in between): the mean
    loss of the steps since the last read and the last step's loss (averaged over processes),
    sentences per second and the share of the steps' time spent outside the encoder. The time of
    a step that compiled the encoder, of checkpoints and of dev evaluations is kept apart."""

    def __init__(self, runner: StepRunner, world: int, bar, last_loss: float):
        self.runner, self.world, self.bar = runner, world, bar
        self.device = runner.model.device
        self.last_loss = last_loss
        self.sentences, self.seconds, self.compile_seconds = 0, 0.0, 0.0
        self.encoder_seconds, self.step_seconds = 0.0, 0.0
        self._sum = torch.zeros((), device=self.device)
        self._last = None
        self._steps = self._sentences = 0
        self._excluded = 0.0
        self._since = time.perf_counter()

    def restart(self) -> None:
        """Start timing anew (after a checkpoint or an evaluation, which are no training)."""
        self._since, self._excluded = time.perf_counter(), 0.0
        self.runner.clock.pause()

    def begin(self) -> None:
        """A step begins."""
        self._started, self._graphs = time.perf_counter(), self.runner.compiled_graphs
        self.runner.clock.start_step()

    def add(self, loss: torch.Tensor, sentences: int) -> None:
        """Count the step that ends with ``loss`` (on the device) and trained ``sentences``: no
        synchronization, unless the step compiled (its time is then kept apart)."""
        self._sum.add_(loss)
        self._last = loss
        self._steps += 1
        self._sentences += sentences
        compiled = self.runner.compiled_graphs != self._graphs
        self.runner.clock.end_step(kept=not compiled)
        if compiled:
            _synchronize(self.device)
            seconds = time.perf_counter() - self._started
            self.compile_seconds += seconds
            self._excluded += seconds

    def read(self) -> float:
        """Synchronize, update the bar and return the last step's loss."""
        if self._last is None:
            return self.last_loss
        values = torch.stack([self._sum, self._last])
        if self.world > 1:
            dist.all_reduce(values)  # the mean over processes: the loss of the whole batch
            values /= self.world
        mean, self.last_loss = values.tolist()
        seconds = max(time.perf_counter() - self._since - self._excluded, 1e-9)
        self.sentences += self._sentences
        self.seconds += seconds
        encoder, total = self.runner.clock.read()
        self.encoder_seconds += encoder
        self.step_seconds += total
        postfix = {"loss": format_loss(mean / self._steps),
                   "sentences_per_s": f"{self._sentences / seconds:.1f}"}  # fmt: skip
        if total > 0:
            postfix["outside_encoder"] = f"{1 - encoder / total:.0%}"
        if self.device.type == "cuda":
            postfix["peak_mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        self.bar.set_postfix(postfix)
        self._sum.zero_()
        self._last, self._steps, self._sentences = None, 0, 0
        self._since, self._excluded = time.perf_counter(), 0.0
        return self.last_loss

    def summary(self) -> dict:
        """Sentences trained, seconds, sentences per second, compile seconds, share outside."""
        return {
            "sentences": self.sentences, "seconds": self.seconds,
            "sentences_per_s": self.sentences / self.seconds if self.seconds else None,
            "compile_seconds": self.compile_seconds if self.runner.compiled is not None else None,
            "outside_encoder": 1 - self.encoder_seconds / self.step_seconds if self.step_seconds else None,
        }  # fmt: skip


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def packed_attention_problem(device: torch.device) -> str | None:
    """Why ``packed=True`` cannot run here (None when it can): it needs flash-attention's varlen
    kernels (the ``flash-attn`` package) on a CUDA GPU with bf16, which they compute in."""
    missing = packed_attention_missing()
    if missing:
        return missing
    if device.type != "cuda":
        return f"--packed runs flash-attention's varlen kernels, on a CUDA GPU; the device here is {device}"
    if not torch.cuda.is_bf16_supported():
        return "--packed runs flash-attention's varlen kernels in bf16, which this GPU does not support"
    return None


def load_model(config: TrainingConfig, device) -> SimCSE:
    """The model to train: with the varlen attention for ``packed`` (an encoder that has none is
    refused), else PyTorch's scaled-dot-product attention where the architecture supports it."""
    options = {"pooling": config.pooling, "max_seq_length": config.max_seq_length or TRAINING_MAX_SEQ_LENGTH,
               "mlp_head": config.mlp_head, "backend": config.backend, "device": device}  # fmt: skip
    if config.packed:
        try:
            return SimCSE(config.model, attn_implementation=PACKED_ATTENTION, **options)
        except (ValueError, ImportError) as error:
            raise ValueError(
                f"--packed: {config.model} cannot run with a varlen attention ({PACKED_ATTENTION}) here: "
                f"{str(error).splitlines()[0]}"
            ) from None
    try:
        return SimCSE(config.model, attn_implementation="sdpa", **options)
    except ValueError as error:
        if "sdpa" not in str(error) and "scaled_dot_product" not in str(error):
            raise
        return SimCSE(config.model, **options)


def _init_distributed(config: TrainingConfig) -> tuple[int, int, str | None, bool]:
    """``(rank, world size, device, created)``. Under torchrun (``WORLD_SIZE`` > 1) the process
    group is initialized from its environment (``created``), gloo on CPUs and NCCL on GPUs (one
    per ``LOCAL_RANK``), unless the caller already did."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, config.device, False
    wants_cuda = (config.device or _default_device()).startswith("cuda")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    device = config.device
    if wants_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return dist.get_rank(), dist.get_world_size(), device, created


def train(config: TrainingConfig) -> dict:
    """Run (or resume) unsupervised SimCSE training; returns a summary (steps, last loss,
    sentences per second, best dev score, output folder). The final model is written to
    ``config.output`` as a sentence-transformers folder, the best dev model (with ``dev_sts``)
    to ``output/best``.

    Batches are tokenized ahead in a background thread (:mod:`simcse_fast.batching`) and a step
    reads nothing back from the device: the loss is read every ``log_steps`` steps and at
    checkpoints. ``compile``: the encoder under ``torch.compile`` (compile time reported apart).
    ``packed``: unpadded batches through a varlen attention (flash-attn, on a GPU).

    Under ``torchrun --nproc_per_node K`` (or with a process group already initialized) each
    process encodes its share of every batch of ``batch_size`` sentences (``batch_size`` must
    be a multiple of K), negatives come from all processes (``gather_across_devices``),
    DistributedDataParallel averages the gradients, and rank 0 alone writes checkpoints, the
    model and the progress bar. ``mini_batch_size`` / ``mini_batch_tokens`` turn on gradient
    caching (:func:`cached_step`). The summary's ``rank`` says which process returned it."""
    config.validate()
    rank, world, device, created = _init_distributed(config)
    try:
        with quiet_transformers():
            return _train(config, rank, world, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(config: TrainingConfig, rank: int, world: int, device) -> dict:
    from tqdm.auto import tqdm

    config.validate(world_size=world)
    if config.packed:
        problem = packed_attention_problem(torch.device(device or _default_device()))
        if problem is not None:
            raise ValueError(problem)
    sentences = read_sentences(config.sentences, config.min_chars)
    dev_pairs = read_sts_pairs(config.dev_sts) if config.dev_sts else None
    output = Path(config.output)
    steps_per_epoch = math.ceil(len(sentences) / config.batch_size)
    total_steps = planned_steps(config.epochs, config.max_steps, steps_per_epoch)
    checkpoint, saved = _find_checkpoint(config, rank, world)
    schedule = new_schedule(config.warmup_ratio, total_steps)
    if saved is not None:
        saved_schedule = _saved_schedule(saved, steps_per_epoch)
        schedule = resumed_schedule(saved_schedule, saved["position"]["step"], total_steps, output)
    replace = check_output(config, checkpoint)
    if world > 1:
        dist.barrier()  # every process has checked the folder before rank 0 writes to it

    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002
    torch.manual_seed(config.seed)
    model = load_model(config, device)
    # Recorded only now that data and model are loaded: a start that fails leaves the folder as it was.
    if rank == 0:
        record_run(config, replace)
    if world > 1:
        dist.barrier()
    # Each process draws its own dropout masks; rank 0 draws what a single process would.
    torch.manual_seed(config.seed + rank)
    optimizer = new_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(**schedule))
    position = {"epoch": 0, "batch": 0, "step": 0}
    last_loss, best_dev = float("nan"), None
    if saved is not None:
        model.load_state_dict(saved["model"])
        _load_optimizer_state(optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        position = dict(saved["position"])
        last_loss, best_dev = saved.get("last_loss", last_loss), _best_dev_until(output, position["step"])
        _restore_random_states(saved["random_states"][rank])
        if schedule != saved_schedule:
            _restart_decay(optimizer, scheduler, schedule, position["step"], rank, output)
    already_complete = saved is not None and position["step"] >= total_steps
    saved_length = config.max_seq_length or model.base_max_seq_length
    model.train()
    stop_group = _stop_group(world)

    def evaluate(step):
        with _attention(model, "sdpa" if config.packed else None):
            return _evaluate_dev(model, dev_pairs, step, best_dev, saved_length, config, bar, rank, world)

    bar = tqdm(total=total_steps, initial=position["step"], desc="SimCSE", unit="step",
               disable=not config.show_progress_bar or rank != 0)  # fmt: skip
    # The starting model competes for "best" too; a resumed run evaluates its starting checkpoint
    # if a stop came between that checkpoint and its evaluation.
    evaluated_there = position["step"] in (0, total_steps) or position["step"] % config.checkpoint_steps == 0
    if evaluated_there and not _dev_score_recorded(output, position["step"]):
        best_dev = evaluate(position["step"])
    plan = batch_plan(len(sentences), config.batch_size, config.seed, total_steps, position, rank, world)
    tokenize = tokenization(model, config)

    def prepare(planned):
        if planned.indices is None:
            return None
        return tokenize([sentences[index] for index in planned.indices], planned.sentences)

    runner = StepRunner(model, optimizer, scheduler, config, world=world)
    progress = _Progress(runner, world, bar, last_loss)
    try:
        with _StopRequests() as stop, Prefetcher(plan, prepare) as batches:
            progress.restart()
            for planned, batch in batches:
                position["epoch"], position["batch"] = planned.epoch, planned.batch
                if batch is None:
                    continue
                progress.begin()
                loss = runner(batch.to(model.device))
                position["step"] += 1
                progress.add(loss, batch.sentences)
                bar.update()
                signal_name = stop.requested(world, stop_group)
                scheduled = position["step"] % config.checkpoint_steps == 0 or position["step"] == total_steps
                if scheduled or signal_name or position["step"] % config.log_steps == 0:
                    last_loss = progress.read()
                if scheduled or signal_name:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "schedule": schedule,
                             "last_loss": last_loss}  # fmt: skip
                    folder = _checkpoint(state, position, config, rank, world)
                    if signal_name:
                        bar.close()
                        raise TrainingInterrupted(signal_name, position["step"], folder)
                    best_dev = evaluate(position["step"])
                    progress.restart()
            bar.close()
            if rank == 0:
                _save_model(model, output, saved_length)
    finally:
        runner.close()
    if world > 1:
        dist.barrier()
    return {"steps": position["step"], "last_loss": last_loss, "output": str(output), "rank": rank,
            "best_dev": None if best_dev is None else best_dev["score"],
            "best_dev_step": None if best_dev is None else best_dev["step"],
            "already_complete": already_complete, "max_seq_length": saved_length,
            "max_seq_length_source": "chosen" if config.max_seq_length else "the base model's",
            **progress.summary()}  # fmt: skip


def _stop_group(world: int):
    """The process group on which processes agree to stop: the default one when it is gloo (its
    all-reduce runs on the host); under NCCL a gloo group beside it, so that the agreement
    neither synchronizes with the GPU nor copies to it."""
    if world == 1 or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


@contextlib.contextmanager
def _attention(model: SimCSE, implementation: str | None):
    """``model``'s encoder with the attention ``implementation`` for the duration (None: as it
    is). Packed training's varlen attention computes in half precision only; evaluation runs in
    fp32 through PyTorch's, as ``simcse-fast eval`` does."""
    if implementation is None:
        yield model
        return
    before = model.encoder.config._attn_implementation
    model.encoder.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.encoder.set_attn_implementation(before)


def format_loss(loss: float) -> str:
    """Four significant digits: SimCSE's loss falls to 1e-4..1e-2, which fixed decimals print as 0."""
    return f"{loss:.4g}"


def _find_checkpoint(config: TrainingConfig, rank: int, world: int) -> tuple[Path | None, dict | None]:
    """The checkpoint a run continues (``resume``) and its state, or ``(None, None)``."""
    output = Path(config.output)
    checkpoint = latest_checkpoint(output) if config.resume else None
    if config.resume is True and checkpoint is None:
        raise ValueError(
            f"--resume: no checkpoint in {output / 'checkpoints'}; use --resume=auto to start a new run "
            "when there is none"
        )
    if checkpoint is None:
        if config.resume == "auto" and rank == 0:
            print(f"simcse-fast: no checkpoint in {output / 'checkpoints'}, starting a new run",
                  file=sys.stderr)  # fmt: skip
        return None, None
    saved = load_checkpoint(checkpoint)
    if len(saved["random_states"]) != world:
        raise ValueError(
            f"--resume: the checkpoint in {checkpoint} was made by {len(saved['random_states'])} "
            f"process(es), this run has {world}; resume with the same --nproc_per_node"
        )
    return checkpoint, saved


def _saved_schedule(saved: dict, steps_per_epoch: int) -> dict:
    """The schedule a checkpoint was trained with (recomputed from its settings when it predates
    the ``schedule`` entry)."""
    if "schedule" in saved:
        return dict(saved["schedule"])
    settings = saved["config"]
    total = planned_steps(settings["epochs"], settings["max_steps"], steps_per_epoch)
    return new_schedule(settings["warmup_ratio"], total)


def _restart_decay(optimizer, scheduler, schedule: dict, step: int, rank: int, output: Path) -> None:
    """Put an extended run's learning rate on its new schedule at the resume ``step`` (the
    optimizer's saved learning rate is the old schedule's, 0 for a finished run) and say so."""
    factor = _linear_schedule(**schedule)(step)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    if rank == 0:
        start = max(schedule["warmup_steps"], step)
        print(
            f"simcse-fast: extending the run in {output} to {schedule['total_steps']} steps from step "
            f"{step}: the learning rate decays linearly from {scheduler.base_lrs[0]:g} at step {start} to 0 "
            f"at step {schedule['total_steps']}",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _sequence_length(model: SimCSE, length: int):
    """``model`` truncating at ``length`` tokens for the duration: as it is saved and evaluated."""
    training_length, model.max_seq_length = model.max_seq_length, length
    try:
        yield model
    finally:
        model.max_seq_length = training_length


def _save_model(model: SimCSE, folder: Path, length: int) -> None:
    """Save ``model`` as every saved model of a run is (final, best): truncating at ``length``."""
    with _sequence_length(model, length):
        model.save(folder)


class TrainingInterrupted(Exception):
    """A SIGTERM or SIGINT stopped training at a step boundary, after a checkpoint was written."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved in {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + getattr(signal, signal_name).value


class _StopRequests:
    """While training, SIGTERM (preemption) and SIGINT (Ctrl-C) ask for a stop at the next step
    boundary instead of killing the step; a second SIGINT interrupts at once. Only the main
    thread can install handlers; elsewhere signals keep their default behaviour."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        if self.received == "SIGINT" and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name

    def requested(self, world: int, group=None) -> str | None:
        """The signal to stop for, agreed by every process (any one's request stops all) over
        the gloo process ``group`` (None: the default one), on the host."""
        if world == 1:
            return self.received
        flag = torch.tensor([0 if self.received is None else 1 if self.received == "SIGINT" else 2])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return {0: None, 1: "SIGINT", 2: "SIGTERM"}[int(flag)]


def _dev_scores(output: Path) -> list[dict]:
    """The dev evaluations recorded in ``output`` (``{"step", "score"}`` each; none if unreadable)."""
    try:
        return json.loads((output / DEV_SCORES_FILE).read_text())
    except (OSError, ValueError):
        return []


def _dev_score_recorded(output: Path, step: int) -> bool:
    return any(entry["step"] == step for entry in _dev_scores(output))


def _best_dev_until(output: Path, step: int) -> dict | None:
    """The best dev evaluation (``{"step", "score"}``) recorded up to ``step`` (a resumed run
    forgets later ones)."""
    kept = [entry for entry in _dev_scores(output) if entry["step"] <= step]
    return max(kept, key=lambda entry: entry["score"]) if kept else None


def load_checkpoint(folder: Path) -> dict:
    """A checkpoint's state, read with ``weights_only=True``: tensors and plain types only, so a
    checkpoint from elsewhere cannot run code. Raises ``ValueError`` for one that holds more."""
    try:
        return torch.load(folder / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"--resume: {folder / CHECKPOINT_FILE} holds objects other than tensors and plain values, "
            f"which simcse-fast never writes; refusing to load it ({str(error).splitlines()[0]})"
        ) from None


def _checkpoint(state: dict, position: dict, config: TrainingConfig, rank: int, world: int) -> Path:
    """An atomic checkpoint of ``state`` (model, optimizer, scheduler, schedule, last loss) with
    the data position and every process's random states; returns its folder."""
    folder = Path(config.output) / "checkpoints" / f"step-{position['step']}"
    random_states = [_random_states()]
    if world > 1:
        random_states = [None] * world
        dist.all_gather_object(random_states, _random_states())
    if rank == 0:
        _save_checkpoint(
            folder,
            {**state, "random_states": random_states, "position": dict(position),
             "config": dataclasses.asdict(config)},
            config.keep_checkpoints,
        )  # fmt: skip
    return folder


def _evaluate_dev(model, dev_pairs, step, best_dev, length, config, bar, rank, world) -> dict | None:
    """Dev evaluation at ``step`` (rank 0), at the sequence ``length`` the saved models use so that
    the score is the one ``simcse-fast eval`` gives the saved model: one line per evaluation, the
    best model (the starting one included, at step 0) kept in ``output/best``, every score in
    ``dev_scores.json``. Returns the best evaluation so far, ``{"step", "score"}``."""
    if dev_pairs is None:
        return best_dev
    output = Path(config.output)
    if rank == 0:
        bar.set_postfix_str(f"step {step}: evaluating on dev", refresh=True)
        with _sequence_length(model, length):
            score = evaluate_sts(model, dev_pairs)
        what = f"step {step}" if step else f"step 0 (the base model, at max_seq_length {length} as saved)"
        bar.write(f"{what}: dev Spearman x100 = {score:.2f}")
        scores_file = output / DEV_SCORES_FILE
        scores = json.loads(scores_file.read_text()) if scores_file.exists() else []
        _write_json_atomically(output / DEV_SCORES_FILE, [*scores, {"step": step, "score": score}])
        if best_dev is None or score > best_dev["score"]:
            best_dev = {"step": step, "score": score}
            _save_model(model, output / "best", length)
    if world > 1:
        shared = [best_dev]
        dist.broadcast_object_list(shared, src=0)
        best_dev = shared[0]
    return best_dev
