"""Unsupervised SimCSE training: one sentence per line in, a sentence-transformers folder out.

Each batch of B sentences is tokenized once and encoded as 2B rows (the batch twice), so that
dropout gives the two views in one forward pass (the official SimCSE trick); row ``i`` and row
``B + i`` are positives, every other row of the second half is a negative:
``loss = info_nce(z[:B], z[B:], scale=1 / temperature)``, pooled and scored by the fused ops.
AdamW with linear warm-up and decay, gradient clipping, bf16 autocast on GPUs that support it.

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
from .config import TRAINING_MAX_SEQ_LENGTH, TrainingConfig
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


def new_schedule(config: TrainingConfig, total_steps: int) -> dict:
    """The learning-rate schedule of a new run (the arguments of ``_linear_schedule``)."""
    warmup_steps = int(config.warmup_ratio * total_steps)
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


def mini_batches(attention_mask: torch.Tensor, mini_batch_size=None, mini_batch_tokens=None) -> list[slice]:
    """Contiguous row ranges of a tokenized batch for gradient caching: at most
    ``mini_batch_size`` rows, and rows x (their longest length) at most ``mini_batch_tokens``
    (a range holds at least one row whatever the budget); one range when both are None."""
    rows = attention_mask.shape[0]
    if mini_batch_size is None and mini_batch_tokens is None:
        return [slice(0, rows)]
    lengths = _used_lengths(attention_mask).tolist()
    ranges, start = [], 0
    while start < rows:
        stop, longest = start + 1, lengths[start]
        while stop < rows:
            wider = max(longest, lengths[stop])
            if mini_batch_size is not None and stop + 1 - start > mini_batch_size:
                break
            if mini_batch_tokens is not None and (stop + 1 - start) * wider > mini_batch_tokens:
                break
            stop, longest = stop + 1, wider
        ranges.append(slice(start, stop))
        start = stop
    return ranges


def _used_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past the last present position (the length for right padding)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return ((attention_mask != 0) * positions).amax(dim=1)


def _rows_of(features: dict, rows: slice) -> dict:
    """The features of ``rows`` without the trailing columns that are padding in all of them
    (leading ones stay: removing them would shift the position ids of left-padded rows)."""
    width = max(1, int(_used_lengths(features["attention_mask"][rows]).max()))
    return {name: tensor[rows, :width] for name, tensor in features.items()}


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
    are all-reduced once, after the last range.
    """
    device = features["attention_mask"].device
    states, pieces = [], []
    with torch.no_grad():
        for rows in ranges:
            states.append(_rng_state(device))
            pieces.append(encode(_rows_of(features, rows)))
    embeddings = torch.cat(pieces).requires_grad_()
    loss = loss_fn(embeddings)
    loss.backward()
    for index, (rows, state) in enumerate(zip(ranges, states, strict=True)):
        _set_rng_state(state, device)
        last = index == len(ranges) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            encode(_rows_of(features, rows)).backward(embeddings.grad[rows])
    return loss.detach()


def _init_distributed(config: TrainingConfig) -> tuple[int, int, str | None, bool]:
    """``(rank, world size, device, created)``. Under torchrun (``WORLD_SIZE`` > 1) the process
    group is initialized from its environment (``created``), gloo on CPUs and NCCL on GPUs (one
    per ``LOCAL_RANK``), unless the caller already did."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, config.device, False
    wants_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
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
    best dev score, output folder). The final model is written to ``config.output`` as a
    sentence-transformers folder, the best dev model (with ``dev_sts``) to ``output/best``.

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
    sentences = read_sentences(config.sentences, config.min_chars)
    dev_pairs = read_sts_pairs(config.dev_sts) if config.dev_sts else None
    output = Path(config.output)
    steps_per_epoch = math.ceil(len(sentences) / config.batch_size)
    total_steps = planned_steps(config.epochs, config.max_steps, steps_per_epoch)
    checkpoint, saved = _find_checkpoint(config, rank, world)
    schedule = new_schedule(config, total_steps)
    if saved is not None:
        saved_schedule = _saved_schedule(saved, steps_per_epoch)
        schedule = resumed_schedule(saved_schedule, saved["position"]["step"], total_steps, output)
    replace = check_output(config, checkpoint)
    if world > 1:
        dist.barrier()  # every process has checked the folder before rank 0 writes to it

    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002
    torch.manual_seed(config.seed)
    model = SimCSE(
        config.model, pooling=config.pooling, max_seq_length=config.max_seq_length or TRAINING_MAX_SEQ_LENGTH,
        mlp_head=config.mlp_head, backend=config.backend, device=device,
    )  # fmt: skip
    # Recorded only now that data and model are loaded: a start that fails leaves the folder as it was.
    if rank == 0:
        record_run(config, replace)
    if world > 1:
        dist.barrier()
    # Each process draws its own dropout masks; rank 0 draws what a single process would.
    torch.manual_seed(config.seed + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(**schedule))
    position = {"epoch": 0, "batch": 0, "step": 0}
    last_loss, best_dev = float("nan"), None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        position = dict(saved["position"])
        last_loss, best_dev = saved.get("last_loss", last_loss), _best_dev_until(output, position["step"])
        _restore_random_states(saved["random_states"][rank])
        if schedule != saved_schedule:
            _restart_decay(optimizer, scheduler, schedule, position["step"], rank, output)
    already_complete = saved is not None and position["step"] >= total_steps
    saved_length = config.max_seq_length or model.base_max_seq_length
    use_bf16 = model.device.type == "cuda" and torch.cuda.is_bf16_supported()
    model.train()
    network = model
    if world > 1:
        # The encoder's pooler (and an unused MLP head) take no part in the loss.
        network = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    caching = config.mini_batch_size is not None or config.mini_batch_tokens is not None

    def encode(features):
        with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return network(features, use_mlp_head=True)

    def loss_fn(embeddings):
        """Row i and row B + i (the two dropout views of sentence i) are positives."""
        rows = embeddings.shape[0] // 2
        return functional.info_nce(
            embeddings[:rows], embeddings[rows:], scale=1.0 / config.temperature, backend=config.backend,
            gather_across_devices=world > 1,
        )  # fmt: skip

    def evaluate(step):
        return _evaluate_dev(model, dev_pairs, step, best_dev, saved_length, config, bar, rank, world)

    bar = tqdm(total=total_steps, initial=position["step"], desc="SimCSE", unit="step",
               disable=not config.show_progress_bar or rank != 0)  # fmt: skip
    # The starting model competes for "best" too; a resumed run evaluates its starting checkpoint
    # if a stop came between that checkpoint and its evaluation.
    evaluated_there = position["step"] in (0, total_steps) or position["step"] % config.checkpoint_steps == 0
    if evaluated_there and not _dev_score_recorded(output, position["step"]):
        best_dev = evaluate(position["step"])
    started, trained_sentences = time.perf_counter(), 0
    with _StopRequests() as stop:
        while position["step"] < total_steps:
            order = torch.randperm(
                len(sentences), generator=torch.Generator().manual_seed(config.seed + position["epoch"])
            )
            while position["batch"] < steps_per_epoch and position["step"] < total_steps:
                indices = order[
                    position["batch"] * config.batch_size : (position["batch"] + 1) * config.batch_size
                ]
                position["batch"] += 1
                # Every process takes an equal share (the last batch of an epoch may lose up to
                # world - 1 sentences); a lone sentence has no negatives.
                usable = len(indices) - len(indices) % world
                if usable < 2:
                    continue
                share = usable // world
                batch = [sentences[index] for index in indices[rank * share : (rank + 1) * share].tolist()]
                features = model.tokenize(batch)
                doubled = {name: torch.cat([tensor, tensor]) for name, tensor in features.items()}
                if caching:
                    mask = doubled["attention_mask"]
                    ranges = mini_batches(mask, config.mini_batch_size, config.mini_batch_tokens)
                    loss = cached_step(
                        encode, doubled, ranges, loss_fn, no_sync=network.no_sync if world > 1 else None
                    )
                else:
                    loss = loss_fn(encode(doubled))
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position["step"] += 1
                loss = loss.detach()
                if world > 1:
                    dist.all_reduce(loss)  # the mean over processes: the loss of the whole batch
                    loss /= world
                last_loss = loss.item()
                trained_sentences += usable
                rate = trained_sentences / (time.perf_counter() - started)
                postfix = {"loss": format_loss(last_loss), "sentences_per_s": f"{rate:.1f}"}
                if model.device.type == "cuda":
                    postfix["peak_mem"] = f"{torch.cuda.max_memory_allocated(model.device) / 2**30:.2f} GiB"
                bar.set_postfix(postfix)
                bar.update()
                signal_name = stop.requested(world)
                scheduled = position["step"] % config.checkpoint_steps == 0 or position["step"] == total_steps
                if scheduled or signal_name:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "schedule": schedule,
                             "last_loss": last_loss}  # fmt: skip
                    folder = _checkpoint(state, position, config, rank, world)
                    if signal_name:
                        bar.close()
                        raise TrainingInterrupted(signal_name, position["step"], folder)
                    best_dev = evaluate(position["step"])
            if position["batch"] >= steps_per_epoch:
                position = {"epoch": position["epoch"] + 1, "batch": 0, "step": position["step"]}
        bar.close()
        if rank == 0:
            _save_model(model, output, saved_length)
    if world > 1:
        dist.barrier()
    return {"steps": position["step"], "last_loss": last_loss, "output": str(output), "rank": rank,
            "best_dev": None if best_dev is None else best_dev["score"],
            "best_dev_step": None if best_dev is None else best_dev["step"],
            "already_complete": already_complete, "max_seq_length": saved_length,
            "max_seq_length_source": "chosen" if config.max_seq_length else "the base model's"}  # fmt: skip


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
    return {"warmup_steps": int(settings["warmup_ratio"] * total), "total_steps": total, "restart_step": 0}


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

    def requested(self, world: int) -> str | None:
        """The signal to stop for, agreed by every process (any one's request stops all)."""
        if world == 1:
            return self.received
        flag = torch.tensor([0 if self.received is None else 1 if self.received == "SIGINT" else 2])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "SIGINT", 2: "SIGTERM"}[int(flag)]


def _dev_score_recorded(output: Path, step: int) -> bool:
    try:
        return any(entry["step"] == step for entry in json.loads((output / DEV_SCORES_FILE).read_text()))
    except (OSError, ValueError):
        return False


def _best_dev_until(output: Path, step: int) -> dict | None:
    """The best dev evaluation (``{"step", "score"}``) recorded up to ``step`` (a resumed run
    forgets later ones)."""
    try:
        scores = json.loads((output / DEV_SCORES_FILE).read_text())
    except (OSError, ValueError):
        return None
    kept = [entry for entry in scores if entry["step"] <= step]
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
