"""Unsupervised SimCSE training: one sentence per line in, a sentence-transformers folder out.

Each batch of B sentences is tokenized once and encoded as 2B rows (the batch twice), so that
dropout gives the two views in one forward pass (the official SimCSE trick); row ``i`` and row
``B + i`` are positives, every other row of the second half is a negative:
``loss = info_nce(z[:B], z[B:], scale=1 / temperature)``, pooled and scored by the fused ops.
AdamW with linear warm-up and decay, gradient clipping, bf16 autocast on GPUs that support it.

Checkpoints (every ``checkpoint_steps``, in ``OUTPUT/checkpoints/step-N``) hold the model,
optimizer, scheduler, every random state and the data position; ``resume=True`` continues from
the latest, and the run then ends with the same weights as an uninterrupted one. The data order
of epoch ``e`` is a permutation seeded by ``seed + e``, so the position is (epoch, batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import functional
from .encoder import SimCSE
from .evaluation import evaluate_sts, read_sts_pairs

CHECKPOINT_FILE = "training_state.pt"


class TrainingDataError(ValueError):
    """A sentences file that is missing, unreadable or has too few usable lines."""


@dataclasses.dataclass
class TrainingConfig:
    """Everything a run depends on; saved in each checkpoint."""

    sentences: str
    output: str
    model: str = "distilroberta-base"
    batch_size: int = 128
    max_seq_length: int = 32
    pooling: str = "mean"
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-5
    temperature: float = 0.05
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_steps: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    backend: str = "auto"
    min_chars: int = 10
    mlp_head: bool = False
    dev_sts: str | None = None
    device: str | None = None
    show_progress_bar: bool = True
    mini_batch_size: int | None = None
    mini_batch_tokens: int | None = None

    def validate(self) -> None:
        positive = ("batch_size", "max_seq_length", "epochs", "checkpoint_steps", "keep_checkpoints")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError(
                "batch_size must be at least 2: the other sentences of a batch are the negatives"
            )
        for name in ("max_steps", "mini_batch_size", "mini_batch_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive; got {self.temperature!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}")


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


def _linear_schedule(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _random_states() -> dict:
    # The global generators, legacy numpy one included: they are what libraries draw from.
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}  # noqa: NPY002
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
        return _train(config, rank, world, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(config: TrainingConfig, rank: int, world: int, device) -> dict:
    from tqdm.auto import tqdm

    if config.batch_size % world:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of the number of processes ({world})"
        )
    sentences = read_sentences(config.sentences, config.min_chars)
    dev_pairs = read_sts_pairs(config.dev_sts) if config.dev_sts else None
    output = Path(config.output)
    checkpoint = latest_checkpoint(output) if config.resume else None
    saved = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=False) if checkpoint else None
    if saved is not None:
        for name in ("batch_size", "seed", "epochs", "max_steps", "model"):
            if saved["config"][name] != getattr(config, name):
                raise ValueError(
                    f"--resume: the checkpoint in {checkpoint} was made with "
                    f"{name}={saved['config'][name]!r}, "
                    f"this run asks for {getattr(config, name)!r}; use the same settings or a new --output"
                )
        if len(saved["random_states"]) != world:
            raise ValueError(
                f"--resume: the checkpoint in {checkpoint} was made by {len(saved['random_states'])} "
                f"process(es), this run has {world}; resume with the same --nproc_per_node"
            )

    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002
    torch.manual_seed(config.seed)
    model = SimCSE(
        config.model, pooling=config.pooling, max_seq_length=config.max_seq_length, mlp_head=config.mlp_head,
        backend=config.backend, device=device,
    )  # fmt: skip
    # Each process draws its own dropout masks; rank 0 draws what a single process would.
    torch.manual_seed(config.seed + rank)
    steps_per_epoch = math.ceil(len(sentences) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup_steps, total_steps))
    position = {"epoch": 0, "batch": 0, "step": 0}
    best_dev = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        position, best_dev = saved["position"], saved["best_dev"]
        _restore_random_states(saved["random_states"][rank])
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

    last_loss = float("nan")
    bar = tqdm(total=total_steps, initial=position["step"], desc="SimCSE", unit="step",
               disable=not config.show_progress_bar or rank != 0)  # fmt: skip
    started, trained_sentences = time.perf_counter(), 0
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
            postfix = {"loss": f"{last_loss:.4f}", "sentences_per_s": f"{rate:.1f}"}
            if model.device.type == "cuda":
                postfix["peak_mem"] = f"{torch.cuda.max_memory_allocated(model.device) / 2**30:.2f} GiB"
            bar.set_postfix(postfix)
            bar.update()
            if position["step"] % config.checkpoint_steps == 0 or position["step"] == total_steps:
                best_dev = _checkpoint(
                    model, optimizer, scheduler, position, best_dev, config, dev_pairs, bar, rank, world
                )
        if position["batch"] >= steps_per_epoch:
            position = {"epoch": position["epoch"] + 1, "batch": 0, "step": position["step"]}
    bar.close()
    if rank == 0:
        model.save(output)
    if world > 1:
        dist.barrier()
    return {"steps": position["step"], "last_loss": last_loss, "best_dev": best_dev, "output": str(output),
            "rank": rank}  # fmt: skip


def _checkpoint(model, optimizer, scheduler, position, best_dev, config, dev_pairs, bar, rank, world):
    """Dev evaluation (rank 0) and an atomic checkpoint holding every process's random states;
    returns the best dev score so far (the same on every process)."""
    output = Path(config.output)
    random_states = [_random_states()]
    if world > 1:
        random_states = [None] * world
        dist.all_gather_object(random_states, _random_states())
    if rank == 0:
        if dev_pairs is not None:
            score = evaluate_sts(model, dev_pairs)
            bar.write(f"step {position['step']}: dev Spearman x100 = {score:.2f}")
            if best_dev is None or score > best_dev:
                best_dev = score
                model.save(output / "best")
        _save_checkpoint(
            output / "checkpoints" / f"step-{position['step']}",
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "random_states": random_states,
             "position": dict(position), "best_dev": best_dev, "config": dataclasses.asdict(config)},
            config.keep_checkpoints,
        )  # fmt: skip
    if world > 1:
        shared = [best_dev]
        dist.broadcast_object_list(shared, src=0)
        best_dev = shared[0]
    return best_dev
