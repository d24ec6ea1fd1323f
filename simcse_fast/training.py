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

import dataclasses
import gzip
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

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

    def validate(self) -> None:
        positive = ("batch_size", "max_seq_length", "epochs", "checkpoint_steps", "keep_checkpoints")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError(
                "batch_size must be at least 2: the other sentences of a batch are the negatives"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer; got {self.max_steps!r}")
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


def train(config: TrainingConfig) -> dict:
    """Run (or resume) unsupervised SimCSE training; returns a summary (steps, last loss,
    best dev score, output folder). The final model is written to ``config.output`` as a
    sentence-transformers folder, the best dev model (with ``dev_sts``) to ``output/best``."""
    from tqdm.auto import tqdm

    config.validate()
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

    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002
    torch.manual_seed(config.seed)
    model = SimCSE(
        config.model, pooling=config.pooling, max_seq_length=config.max_seq_length, mlp_head=config.mlp_head,
        backend=config.backend, device=config.device,
    )  # fmt: skip
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
        _restore_random_states(saved["random_states"])
    use_bf16 = model.device.type == "cuda" and torch.cuda.is_bf16_supported()
    model.train()

    last_loss = float("nan")
    bar = tqdm(total=total_steps, initial=position["step"], desc="SimCSE", unit="step",
               disable=not config.show_progress_bar)  # fmt: skip
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
            if len(indices) < 2:  # a lone last sentence has no negatives
                continue
            batch = [sentences[index] for index in indices.tolist()]
            features = model.tokenize(batch)
            doubled = {name: torch.cat([tensor, tensor]) for name, tensor in features.items()}
            with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                embeddings = model(doubled, use_mlp_head=True)
            loss = functional.info_nce(
                embeddings[: len(batch)], embeddings[len(batch) :], scale=1.0 / config.temperature,
                backend=config.backend,
            )  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position["step"] += 1
            last_loss = loss.item()
            trained_sentences += len(batch)
            rate = trained_sentences / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{last_loss:.4f}", sentences_per_s=f"{rate:.1f}")
            bar.update()
            if position["step"] % config.checkpoint_steps == 0 or position["step"] == total_steps:
                if dev_pairs is not None:
                    score = evaluate_sts(model, dev_pairs)
                    bar.write(f"step {position['step']}: dev Spearman x100 = {score:.2f}")
                    if best_dev is None or score > best_dev:
                        best_dev = score
                        model.save(output / "best")
                _save_checkpoint(
                    output / "checkpoints" / f"step-{position['step']}",
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "random_states": _random_states(),
                     "position": dict(position), "best_dev": best_dev, "config": dataclasses.asdict(config)},
                    config.keep_checkpoints,
                )  # fmt: skip
        if position["batch"] >= steps_per_epoch:
            position = {"epoch": position["epoch"] + 1, "batch": 0, "step": position["step"]}
    bar.close()
    model.save(output)
    return {"steps": position["step"], "last_loss": last_loss, "best_dev": best_dev, "output": str(output)}
