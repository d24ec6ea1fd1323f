"""Gradient caching in ``simcse-fast train``: the same step as without it (dropout off), an exact
replay of every mini-batch's dropout (dropout on), and resume to the bitwise same weights."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inputs import SENTENCES, model_weights, stop_after_checkpoint, training_config

import simcse_fast as sf
from simcse_fast import batching, training

pytest.importorskip("transformers")


config = functools.partial(training_config, max_seq_length=16, max_steps=3, checkpoint_steps=2, mlp_head=True)


@pytest.mark.parametrize("mini_batch_size", [1, 3, 8, 13], ids=lambda m: f"m={m}")
def test_cached_training_equals_uncached_without_dropout(
    tiny_bert_without_dropout, sixteen_sentences_file, tmp_path, mini_batch_size
):
    """Batch 4 is 8 encoded rows: mini-batches of 1, 3, all 8 and more than 8 rows."""
    training.train(config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "plain"))
    training.train(
        config(
            tiny_bert_without_dropout,
            sixteen_sentences_file,
            tmp_path / "cached",
            mini_batch_size=mini_batch_size,
        )
    )
    plain, cached = model_weights(tmp_path / "plain"), model_weights(tmp_path / "cached")
    assert plain.keys() == cached.keys()
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_token_budget_equals_uncached_without_dropout(
    tiny_bert_without_dropout, sixteen_sentences_file, tmp_path
):
    training.train(config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "plain"))
    training.train(
        config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "cached", mini_batch_tokens=20)
    )
    plain, cached = model_weights(tmp_path / "plain"), model_weights(tmp_path / "cached")
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_replays_exactly_and_the_step_equals_a_non_cached_reference(tiny_bert_dir):
    """Dropout on: each mini-batch's replay reproduces its first-pass embeddings bitwise, and
    the parameter gradients equal those of encoding each mini-batch with autograd under the
    same random states (a non-cached step that draws the same masks)."""
    model = sf.SimCSE(str(tiny_bert_dir), mlp_head=True, device="cpu")
    model.train()
    features = model.tokenize(SENTENCES + SENTENCES[::-1])
    ranges = training.mini_batches(features["attention_mask"], mini_batch_size=5)
    assert [r.stop - r.start for r in ranges] == [5, 5, 5, 1]

    def loss_fn(embeddings):
        return sf.info_nce(embeddings[:8], embeddings[8:], scale=20.0)

    recorded = []

    def encode(part):
        out = model(part, use_mlp_head=True)
        recorded.append((torch.is_grad_enabled(), out.detach().clone()))
        return out

    torch.manual_seed(7)
    loss = training.cached_step(encode, features, ranges, loss_fn)
    first_pass, replays = recorded[: len(ranges)], recorded[len(ranges) :]
    assert [grad for grad, _ in first_pass] == [False] * len(ranges)
    assert [grad for grad, _ in replays] == [True] * len(ranges)
    for (_, first), (_, replay) in zip(first_pass, replays, strict=True):
        assert torch.equal(first, replay)
    cached_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    torch.manual_seed(7)
    parts = [model(batching.rows_of(features, rows), use_mlp_head=True) for rows in ranges]
    reference_loss = loss_fn(torch.cat(parts))
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss.detach())
    assert len(cached_grads) > 10
    for name, grad in cached_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)


def test_cached_run_resumes_to_the_same_weights(tiny_bert_dir, sixteen_sentences_file, tmp_path, monkeypatch):
    make = functools.partial(
        config, tiny_bert_dir, sixteen_sentences_file, max_steps=6, epochs=2, mini_batch_size=3
    )
    training.train(make(tmp_path / "straight"))
    stop_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        training.train(make(tmp_path / "resumed"))
    monkeypatch.undo()
    training.train(make(tmp_path / "resumed", resume=True))
    straight, resumed = model_weights(tmp_path / "straight"), model_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_mini_batches_respect_both_budgets():
    mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 2 + [0] * 6, [1] * 8, [1] * 3 + [0] * 5, [1] * 1 + [0] * 7])
    assert training.mini_batches(mask) == [slice(0, 5)]
    assert training.mini_batches(mask, mini_batch_size=2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    # rows x longest: [6, 2] -> 12 <= 16, adding 8 would be 24; [8, 3] -> 16, adding 1 would be 24.
    assert training.mini_batches(mask, mini_batch_tokens=16) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert training.mini_batches(mask, mini_batch_tokens=1) == [slice(i, i + 1) for i in range(5)]
    assert training.mini_batches(mask, mini_batch_size=3, mini_batch_tokens=100) == [slice(0, 3), slice(3, 5)]
    features = {"attention_mask": mask, "input_ids": torch.arange(40).reshape(5, 8)}
    assert batching.rows_of(features, slice(3, 5))["input_ids"].shape == (2, 3)


@pytest.mark.parametrize("name", ["mini_batch_size", "mini_batch_tokens"])
def test_bad_mini_batch_settings(tiny_bert_dir, sixteen_sentences_file, tmp_path, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", **{name: 0}))


def torchrun_train(processes: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node P simcse-fast train ...`` (gloo on CPU)."""
    script = shutil.which("simcse-fast") or str(Path(sys.executable).with_name("simcse-fast"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "--no-python", script, "train", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_torchrun_with_two_processes_equals_one(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path):
    """Dropout off, the same global batch of 4: two processes (2 sentences each, negatives
    gathered from both, DDP averaging) train like one process. The runs differ only in fp32
    summation order (all-reduce, gathered loss); AdamW divides each gradient by its own
    magnitude, so for the few weights whose gradient is near its eps (1e-8) that round-off moves
    an update by a few percent of lr (measured: 1.9e-5 with lr 1e-3), hence atol 5e-5."""
    common = [
        "--model", str(tiny_bert_without_dropout), "--batch-size", "4", "--max-seq-length", "16",
        "--max-steps", "3", "--checkpoint-steps", "2", "--lr", "1e-3", "--device", "cpu", "--no-progress",
        "--mlp-head",
    ]  # fmt: skip
    completed = torchrun_train(2, str(sixteen_sentences_file), "--output", str(tmp_path / "ddp"), *common)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trained 3 steps") == 1  # rank 0 alone reports
    single_run = training.train(
        config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "single")
    )
    assert f"last loss {training.format_loss(single_run['last_loss'])}" in completed.stdout
    single, ddp = model_weights(tmp_path / "single"), model_weights(tmp_path / "ddp")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=5e-5, msg=name)
    state_file = tmp_path / "ddp" / "checkpoints" / "step-3" / training.CHECKPOINT_FILE
    assert len(torch.load(state_file, weights_only=False)["random_states"]) == 2
    with pytest.raises(ValueError, match=r"made by 2 process\(es\), this run has 1"):
        training.train(
            config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "ddp", resume=True)
        )


def test_torchrun_with_gradient_caching(tiny_bert_dir, sixteen_sentences_file, tmp_path):
    """Dropout on, two processes, mini-batches of 3 rows: the run finishes and writes one model."""
    completed = torchrun_train(
        2, str(sixteen_sentences_file), "--output", str(tmp_path / "run"), "--model", str(tiny_bert_dir),
        "--batch-size", "4", "--max-steps", "2", "--device", "cpu", "--no-progress", "--mini-batch-size", "3",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "run" / "modules.json").exists()
    assert sf.SimCSE(str(tmp_path / "run"), device="cpu").encode(SENTENCES).shape == (len(SENTENCES), 32)


def test_torchrun_resumes_to_the_same_weights(tiny_bert_dir, sixteen_sentences_file, tmp_path):
    """Two processes, dropout on: a run stopped after its step-2 checkpoint (its later files
    removed) and resumed with --resume ends with the uninterrupted run's weights, bitwise: each
    process gets its own random state back."""
    common = [
        str(sixteen_sentences_file), "--model", str(tiny_bert_dir), "--batch-size", "4", "--max-steps", "4",
        "--checkpoint-steps", "2", "--device", "cpu", "--no-progress", "--mini-batch-size", "3",
    ]  # fmt: skip
    completed = torchrun_train(2, *common, "--output", str(tmp_path / "straight"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-4")
    for saved_model in ("model.safetensors", "modules.json"):
        (tmp_path / "resumed" / saved_model).unlink()
    completed = torchrun_train(2, *common, "--output", str(tmp_path / "resumed"), "--resume")
    assert completed.returncode == 0, completed.stderr[-3000:]
    straight, resumed = model_weights(tmp_path / "straight"), model_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
