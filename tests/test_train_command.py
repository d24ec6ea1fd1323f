"""``simcse-fast train`` and ``eval`` as a new user meets them: arguments checked at once and named
by their flags, a failed start that leaves nothing behind, runs that can be extended, every saved
model with the saved sequence length, a "best" model that may be the starting one, and output
that says what happened."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from inputs import SENTENCES, model_weights, stop_after_checkpoint

import simcse_fast as sf
from simcse_fast import cli, training

pytest.importorskip("transformers")


@pytest.fixture
def dev_file(tmp_path):
    """Eight STS pairs in the tiny BERT's vocabulary, with scores 0..4."""
    path = tmp_path / "dev.tsv"
    pairs = zip(SENTENCES, SENTENCES[::-1], strict=True)
    path.write_text("".join(f"g\tf\t2020\t{i}\t{i % 5}.0\t{a}\t{b}\n" for i, (a, b) in enumerate(pairs)))
    return path


def train_command(model_dir, sentences, output, *options) -> list[str]:
    """``simcse-fast train`` on the tiny BERT: 16 sentences in batches of 4, 3 epochs of 4 steps."""
    return ["train", str(sentences), "--model", str(model_dir), "--output", str(output),
            "--batch-size", "4", "--epochs", "3", "--checkpoint-steps", "2", "--lr", "1e-3",
            "--device", "cpu", "--no-progress", *options]  # fmt: skip


@pytest.fixture
def simcse_fast_train(tiny_bert_dir, sixteen_sentences_file):
    """Runs ``train_command`` into ``output`` through the command's ``main``; returns its status."""

    def run(output, *options) -> int:
        return cli.main(train_command(tiny_bert_dir, sixteen_sentences_file, output, *options))

    return run


BAD_ARGUMENTS = [
    (["--batch-size", "0"], "--batch-size must be a positive integer; got 0"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--lr", "-1e-5"], "--lr must be a positive, finite number; got -1e-05"),
    (["--lr", "nan"], "--lr must be a positive, finite number; got nan"),
    (["--temperature", "0"], "--temperature must be a positive, finite number; got 0.0"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1); got 1.5"),
    (["--max-steps", "-3"], "--max-steps must be a positive integer; got -3"),
    (["--mini-batch-tokens", "0"], "--mini-batch-tokens must be a positive integer; got 0"),
    (["--min-chars", "-1"], "--min-chars must be a non-negative integer; got -1"),
]


def test_arguments_are_checked_by_flag_before_torch_is_imported(tmp_path):
    """Issue 19, item 6: each error names the flag, a negative number in exponent form parses,
    and neither PyTorch nor transformers is imported to say so (that took 7-10 s)."""
    script = f"""
import contextlib, io, json, sys
from simcse_fast import cli
results = []
for options, _ in {BAD_ARGUMENTS!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", "sentences.txt", "--output", "out", *options])
    results.append([code, err.getvalue()])
heavy = [name for name in ("torch", "transformers", "triton") if name in sys.modules]
print(json.dumps({{"results": results, "heavy": heavy}}))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    )
    report = json.loads(completed.stdout)
    assert report["heavy"] == []
    for (options, message), (code, err) in zip(BAD_ARGUMENTS, report["results"], strict=True):
        assert code == cli.USAGE_ERROR and err.startswith(f"simcse-fast: error: {message}"), (options, err)
        assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_eval_names_its_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["eval", "--model", "m", "--sts", "sts.csv", "--batch-size", "0"])
    assert exited.value.code == 2
    assert "argument --batch-size: must be a positive integer; got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_bad_batch_size_is_reported_once(rank, tmp_path, monkeypatch, capsys):
    """Issue 19, item 9: every process meets the error, rank 0 alone prints it, each exits with
    the usage status (no traceback of ours)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(rank))
    code = cli.main(["train", "sentences.txt", "--output", str(tmp_path / "out"), "--batch-size", "6"])
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR
    if rank == 0:
        assert err == (
            "simcse-fast: error: --batch-size (6) must be a multiple of the number of processes (4): "
            "each process encodes an equal share of every batch\n"
        )
    else:
        assert err == ""


def test_a_failed_start_leaves_the_folder_as_it_was(
    tiny_bert_dir, sixteen_sentences_file, simcse_fast_train, tmp_path, capsys
):
    """Issue 19, item 3: a wrong --model used to leave the run file behind, so the corrected
    command was refused; with --overwrite it would have deleted the old run before failing."""
    output, missing = tmp_path / "run", tmp_path / "no-such-model"
    assert cli.main(train_command(missing, sixteen_sentences_file, output, "--max-steps", "2")) == 1
    assert "no such model folder" in capsys.readouterr().err and not output.exists()
    assert simcse_fast_train(output, "--max-steps", "2") == 0
    before, run_file = model_weights(output), (output / training.RUN_FILE).read_text()
    assert cli.main(train_command(missing, sixteen_sentences_file, output, "--overwrite")) == 1
    assert (output / training.RUN_FILE).read_text() == run_file
    after = model_weights(output)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_losses_print_with_significant_digits():
    """Issue 19, item 4: SimCSE's loss (1e-4..4e-2) printed as 0.0000."""
    assert [training.format_loss(x) for x in (3.2e-4, 0.012345, 1.5, float("nan"))] == [
        "0.00032", "0.01235", "1.5", "nan",
    ]  # fmt: skip


def last_loss(out: str) -> str:
    return re.search(r"last loss (\S+?)[;,\n]", out).group(1)


def test_a_finished_run_says_so_and_can_be_extended(simcse_fast_train, tmp_path, capsys):
    """Issue 19, items 4 and 5: --resume on a finished run reports it complete with its last loss
    (it said "last loss nan"); a larger --max-steps extends it (it was refused): the learning rate
    restarts at --lr at the resume step and decays linearly to 0 at the new total."""
    output = tmp_path / "run"
    assert simcse_fast_train(output, "--max-steps", "4") == 0
    finished = last_loss(capsys.readouterr().out)
    assert simcse_fast_train(output, "--max-steps", "4", "--resume") == 0
    assert f"was already complete: 4 steps, last loss {finished}; nothing to train" in capsys.readouterr().out
    at_step_4 = model_weights(output)

    assert simcse_fast_train(output, "--max-steps", "8", "--resume") == 0
    captured = capsys.readouterr()
    assert "trained 8 steps" in captured.out
    assert (
        f"extending the run in {output} to 8 steps from step 4: the learning rate decays linearly from "
        "0.001 at step 4 to 0 at step 8" in captured.err
    )
    step_6 = torch.load(output / "checkpoints" / "step-6" / training.CHECKPOINT_FILE, weights_only=True)
    assert step_6["schedule"] == {"warmup_steps": 0, "total_steps": 8, "restart_step": 4}
    # Steps 5 and 6 ran at factors 4/4 and 3/4; step 7 runs at (8 - 6) / (8 - 4).
    assert step_6["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 2 / 4)
    assert json.loads((output / training.RUN_FILE).read_text())["settings"]["max_steps"] == 8
    at_step_8 = model_weights(output)
    assert any(not torch.equal(at_step_4[name], at_step_8[name]) for name in at_step_4)

    assert simcse_fast_train(output, "--max-steps", "6", "--resume") == 1
    refusal = "is planned for 8 steps and has done 8; --epochs and --max-steps give 6 now"
    assert refusal in capsys.readouterr().err


def test_an_extended_run_resumes_like_an_uninterrupted_one(simcse_fast_train, tmp_path, monkeypatch):
    """The extension's schedule is kept in its checkpoints: stopped and resumed, an extended run
    ends with the weights of one that was not stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extend = ["--max-steps", "8", "--resume"]
    assert simcse_fast_train(straight, "--max-steps", "4") == 0 and simcse_fast_train(straight, *extend) == 0
    assert simcse_fast_train(stopped, "--max-steps", "4") == 0
    stop_after_checkpoint(monkeypatch, 6)
    assert simcse_fast_train(stopped, *extend) == 130
    monkeypatch.undo()
    assert training.latest_checkpoint(stopped).name == "step-6"
    assert simcse_fast_train(stopped, *extend) == 0
    expected, resumed = model_weights(straight), model_weights(stopped)
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_best_may_be_the_starting_model_and_keeps_the_saved_length(
    tiny_bert_dir, dev_file, simcse_fast_train, tmp_path, monkeypatch, capsys
):
    """Issue 19, items 2 and 7: the starting model is evaluated (step 0) and competes for
    "best"; every evaluation runs at the sequence length the saved models use, and best/ is saved
    with it (it kept the training length 32)."""
    scores, lengths = iter([90.0, 80.0, 85.0]), []

    def evaluate_sts(model, pairs):
        lengths.append(model.max_seq_length)
        return next(scores)

    monkeypatch.setattr(training, "evaluate_sts", evaluate_sts)
    output = tmp_path / "run"
    assert simcse_fast_train(output, "--max-steps", "4", "--dev-sts", str(dev_file)) == 0
    out = capsys.readouterr().out
    assert lengths == [64, 64, 64]  # the base model's limit: what the saved models keep
    assert f"best dev Spearman x100 90.00 (step 0, the base model), saved in {output / 'best'}" in out
    steps = [entry["step"] for entry in json.loads((output / training.DEV_SCORES_FILE).read_text())]
    assert steps == [0, 2, 4]
    best = sf.SimCSE(str(output / "best"), device="cpu")
    assert best.max_seq_length == 64
    base = sf.SimCSE(str(tiny_bert_dir), device="cpu")
    for (name, value), expected in zip(best.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(value, expected), name


def test_the_dev_score_is_what_eval_gives_the_saved_model(dev_file, simcse_fast_train, tmp_path, capsys):
    """Issue 19, item 7: training logged 85.19 where ``eval`` of the saved model gave 85.23."""
    output = tmp_path / "run"
    options = ["--max-steps", "2", "--dev-sts", str(dev_file), "--max-seq-length", "6"]
    assert simcse_fast_train(output, *options) == 0
    capsys.readouterr()
    best = max(json.loads((output / training.DEV_SCORES_FILE).read_text()), key=lambda entry: entry["score"])
    assert cli.main(["eval", "--model", str(output / "best"), "--sts", str(dev_file), "--device", "cpu"]) == 0
    assert f"Spearman x100 of cosine similarity = {best['score']:.2f}" in capsys.readouterr().out


def test_eval_without_progress_is_quiet(tiny_bert_dir, dev_file, capsys):
    """Issue 19, item 8: ``eval --no-progress`` still showed transformers' loading bar."""
    command = [
        "eval",
        "--model",
        str(tiny_bert_dir),
        "--sts",
        str(dev_file),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert cli.main(command) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1


def test_a_run_stopped_before_its_first_checkpoint_starts_over(simcse_fast_train, tmp_path, capsys):
    """A folder whose run never reached a checkpoint has nothing to resume: the command says so,
    and --resume=auto starts it over instead of sending the user in a circle."""
    output = tmp_path / "run"
    assert simcse_fast_train(output, "--max-steps", "2") == 0
    shutil.rmtree(output / "checkpoints")
    assert simcse_fast_train(output, "--max-steps", "2") == 1
    assert "stopped before its first checkpoint: start it over with --resume=auto" in capsys.readouterr().err
    assert simcse_fast_train(output, "--max-steps", "2", "--resume=auto") == 0
    assert training.latest_checkpoint(output).name == "step-2"
