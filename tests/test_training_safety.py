"""``simcse-fast train`` never loses or mixes work and says what it does: one run per output
folder, --resume checks what it continues, checkpoints before evaluation, SIGTERM/SIGINT stop at
a step boundary with a checkpoint, safe checkpoint loading, clear messages."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import pytest
import torch
from inputs import SENTENCES, model_weights, training_config

import simcse_fast as sf
from simcse_fast import cli, evaluation, training
from simcse_fast import config as config_module

transformers = pytest.importorskip("transformers")


config = functools.partial(training_config, max_steps=4, checkpoint_steps=2)


def test_a_new_run_into_another_runs_folder_is_refused(tiny_bert_dir, sixteen_sentences_file, tmp_path):
    """Finding 1: a second run used to replace the model and leave the first run's files."""
    training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", dev_sts=None))
    other = sixteen_sentences_file.with_name("other.txt")
    other.write_text("\n".join(reversed(SENTENCES)) + "\n")
    with pytest.raises(
        ValueError, match=r"holds another run \(pooling \('mean' there, 'max' now\); sentences file"
    ):
        training.train(config(tiny_bert_dir, other, tmp_path / "run", pooling="max"))
    with pytest.raises(ValueError, match="holds a run with these settings: continue it with --resume"):
        training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run"))
    (tmp_path / "run" / "best").mkdir()  # a leftover of the old run must go with it
    summary = training.train(config(tiny_bert_dir, other, tmp_path / "run", pooling="max", overwrite=True))
    assert summary["steps"] == 2 and not (tmp_path / "run" / "best").exists()  # 8 sentences, batches of 4
    saved = json.loads((tmp_path / "run" / training.RUN_FILE).read_text())
    assert saved["settings"]["pooling"] == "max" and saved["data"]["path"] == str(other.resolve())


def test_overwrite_never_deletes_a_folder_of_something_else(tiny_bert_dir, sixteen_sentences_file, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match=r"holds no simcse-fast run .* refusing to delete it"):
        training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "photos", overwrite=True))
    assert (tmp_path / "photos" / "holiday.jpg").exists()
    with pytest.raises(ValueError, match="holds files of something else"):
        training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "photos"))


def test_resume_checks_data_and_every_setting(tiny_bert_dir, sixteen_sentences_file, tmp_path):
    """Finding 2: resuming with another file and --pooling max trained nothing and exited 0."""
    training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", max_steps=2))
    other = sixteen_sentences_file.with_name("other.txt")
    other.write_text("\n".join(reversed(SENTENCES)) + "\n")
    resumed = config(tiny_bert_dir, other, tmp_path / "run", max_steps=2, resume=True, pooling="max", lr=5e-4)
    with pytest.raises(
        ValueError, match=r"--resume: .*pooling \('mean' there, 'max' now\); lr .*; sentences file"
    ):
        training.train(resumed)
    sixteen_sentences_file.write_text(
        sixteen_sentences_file.read_text() + "a new line about the cat\n"
    )  # same path
    with pytest.raises(ValueError, match="sentences file content"):
        training.train(
            config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", max_steps=2, resume=True)
        )


def test_resume_without_a_checkpoint(tiny_bert_dir, sixteen_sentences_file, tmp_path, capsys):
    """Finding 3: --resume with no checkpoint trained from step 0 without a word."""
    with pytest.raises(ValueError, match=r"--resume: no checkpoint in .*use --resume=auto"):
        training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", resume=True))
    summary = training.train(
        config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", resume="auto", max_steps=2)
    )
    assert summary["steps"] == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_the_checkpoint_is_written_before_the_dev_evaluation(
    tiny_bert_dir, sixteen_sentences_file, tmp_path, monkeypatch
):
    """Finding 3: a kill during the first dev evaluation lost every step before it. The resumed
    run evaluates the checkpoint whose evaluation was cut short."""
    dev = tmp_path / "dev.tsv"
    dev.write_text(
        "".join(
            f"g\tf\t2020\t{i}\t{i % 5}.0\t{a}\t{b}\n"
            for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[::-1], strict=True))
        )
    )
    evaluate_sts = training.evaluate_sts

    def killed_after_step_0(model, pairs):
        if killed_after_step_0.calls:
            raise KeyboardInterrupt
        killed_after_step_0.calls += 1
        return evaluate_sts(model, pairs)

    killed_after_step_0.calls = 0
    monkeypatch.setattr(training, "evaluate_sts", killed_after_step_0)
    run = config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", dev_sts=str(dev))
    with pytest.raises(KeyboardInterrupt):
        training.train(run)
    assert training.latest_checkpoint(tmp_path / "run").name == "step-2"
    monkeypatch.undo()
    training.train(dataclasses.replace(run, resume=True))
    scores = json.loads((tmp_path / "run" / training.DEV_SCORES_FILE).read_text())
    assert [entry["step"] for entry in scores] == [0, 2, 4]


def send_signal_during_step(monkeypatch, step: int, number: int) -> None:
    """Deliver ``number`` to this process in the middle of step ``step`` (inside its loss)."""
    original = training.functional.info_nce
    calls = {"count": 0}

    def info_nce(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:
            os.kill(os.getpid(), number)
        return original(*args, **kwargs)

    monkeypatch.setattr(training.functional, "info_nce", info_nce)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_step_checkpoints_and_resumes_bitwise(
    tiny_bert_dir, sixteen_sentences_file, tmp_path, monkeypatch, number
):
    """Preemption or Ctrl-C in the middle of step 3: the step finishes, a checkpoint is written
    (step 3 is not a scheduled one), the run stops with 128 + the signal number, and --resume
    ends with the uninterrupted run's weights, bitwise."""
    training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "straight", max_steps=6))
    send_signal_during_step(monkeypatch, 3, number)
    with pytest.raises(training.TrainingInterrupted) as stopped:
        training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "stopped", max_steps=6))
    assert stopped.value.step == 3 and stopped.value.exit_code == 128 + number
    assert training.latest_checkpoint(tmp_path / "stopped").name == "step-3"
    assert signal.getsignal(number) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    monkeypatch.undo()
    training.train(
        config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "stopped", max_steps=6, resume=True)
    )
    straight, resumed = model_weights(tmp_path / "straight"), model_weights(tmp_path / "stopped")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_the_command_says_how_to_resume_after_sigterm(
    tiny_bert_dir, sixteen_sentences_file, tmp_path, monkeypatch, capsys
):
    send_signal_during_step(monkeypatch, 2, signal.SIGTERM)
    arguments = [
        "train", str(sixteen_sentences_file), "--model", str(tiny_bert_dir),
        "--output", str(tmp_path / "run"),
        "--batch-size", "4", "--max-steps", "5", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["simcse-fast", *arguments])
    assert cli.main(arguments) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 2" in err and "simcse-fast train" in err and "--resume" in err


def test_checkpoints_load_safely_and_a_planted_pickle_is_refused(
    tiny_bert_dir, sixteen_sentences_file, tmp_path
):
    training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", max_steps=2))
    checkpoint = training.latest_checkpoint(tmp_path / "run")
    state = torch.load(checkpoint / training.CHECKPOINT_FILE, weights_only=True)  # plain types only
    assert state["position"]["step"] == 2
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**state, "position": Payload()}, checkpoint / training.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="refusing to load it"):
        training.train(
            config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", max_steps=2, resume=True)
        )
    assert not marker.exists()


def test_the_saved_model_keeps_the_base_models_sequence_length(
    tiny_bert_dir, sixteen_sentences_file, tmp_path
):
    """Finding 4: the saved model kept the training length 32, and plain sentence-transformers
    then truncated everything at 32 tokens."""
    summary = training.train(config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "base", max_steps=1))
    assert summary["max_seq_length"] == 64 and summary["max_seq_length_source"] == "the base model's"
    assert sf.SimCSE(str(tmp_path / "base"), device="cpu").max_seq_length == 64
    chosen = training.train(
        config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "chosen", max_steps=1, max_seq_length=16)
    )
    assert (
        chosen["max_seq_length"] == 16
        and sf.SimCSE(str(tmp_path / "chosen"), device="cpu").max_seq_length == 16
    )


def test_model_paths_and_help(tiny_bert_dir, sixteen_sentences_file, tmp_path, capsys):
    """Finding 5: a missing folder gave the hub's repo-id message; the default was not shown."""
    code = cli.main([
        "train", str(sixteen_sentences_file), "--model", str(tmp_path / "no-such-model"),
        "--output", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        code == 1 and err.strip() == f"simcse-fast: error: no such model folder: {tmp_path / 'no-such-model'}"
    )
    with pytest.raises(FileNotFoundError, match=r"no such model folder: \./missing"):
        sf.SimCSE("./missing", device="cpu")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert f"(default: {config_module.DEFAULT_MODEL})" in capsys.readouterr().out.replace("\n", " ").replace(
        "  ", " "
    )


def test_sts_files_with_a_header(tmp_path):
    """Finding 6: a header line failed with "score 'score' is not a number"."""
    path = tmp_path / "sts.tsv"
    path.write_text(
        "genre\tfile\tyear\tid\tscore\tsentence1\tsentence2\nmain\tx\t2012\t1\t4.5\ta cat\ta dog\n"
    )
    pairs = evaluation.read_sts_pairs(path)
    assert pairs.first == ["a cat"] and pairs.scores.tolist() == [4.5]
    path.write_text(path.read_text() + "main\tx\t2012\t2\tfour\tb\tc\n")
    with pytest.raises(evaluation.EvaluationDataError, match=r"sts.tsv:3: score 'four' is not a number"):
        evaluation.read_sts_pairs(path)


def test_a_clean_terminal(tiny_bert_dir, sixteen_sentences_file, tmp_path, capsys):
    """Finding 7: transformers' bars interleaved with ours; info did not say why Triton was
    missing; the top-level help showed raw markup."""
    code = cli.main([
        "train", str(sixteen_sentences_file), "--model", str(tiny_bert_dir),
        "--output", str(tmp_path / "run"),
        "--batch-size", "4", "--max-steps", "2", "--device", "cpu",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    for noise in ("Writing model shards", "Loading weights"):
        assert noise not in captured.err + captured.out
    assert "with max_seq_length 64 (the base model's)" in captured.out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_info_says_why_a_backend_is_missing(capsys, monkeypatch):
    from simcse_fast import _backends

    monkeypatch.setattr(_backends, "TRITON_INTERPRETER", False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "backend 'triton' unavailable here: no CUDA device is available" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 'usable here' half assumes no CUDA device")
@pytest.mark.parametrize(
    "installation, nvcc, expected",
    [
        ("wheel", None, "installed from the wheel, which is pure Python"),
        ("source", None, "installed from source, and there is no nvcc here"),
        ("source", "/opt/cuda/bin/nvcc", "nvcc is here now (/opt/cuda/bin/nvcc): the install ran without it"),
        ("checkout", None, "is a source checkout without a build in place"),
    ],
)
def test_info_tells_the_extension_build_from_its_use_here(installation, nvcc, expected, capsys, monkeypatch):
    """Issue 19, item 10: whether simcse_fast._C was built (and why not) is one line, whether
    the "cuda" backend runs here another."""
    from simcse_fast import _backends

    monkeypatch.setattr(_backends, "_installation", lambda: installation)
    monkeypatch.setattr(_backends, "_find_nvcc", lambda: nvcc)
    monkeypatch.setattr(_backends.importlib.util, "find_spec", lambda name: None)
    # Both halves of the load's result: CI builds the extension, so the real ones say "built".
    extension, error = _backends._load_extension()
    monkeypatch.setattr(_backends, "CUDA_EXTENSION", extension)
    monkeypatch.setattr(_backends, "CUDA_EXTENSION_ERROR", error)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiled CUDA extension simcse_fast._C: not built: " in out and expected in out
    assert "backend 'cuda' unavailable here: the compiled extension simcse_fast._C is not built" in out

    class Built:
        __file__ = "/site-packages/simcse_fast/_C.cpython-311-x86_64-linux-gnu.so"

    monkeypatch.setattr(_backends, "CUDA_EXTENSION", Built)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiled CUDA extension simcse_fast._C: built (_C.cpython-311-x86_64-linux-gnu.so)" in out
    assert "backend 'cuda' unavailable here: no CUDA device is available" in out


def test_info_nce_refuses_an_empty_batch_and_a_bad_scale():
    """Finding 8: an empty batch gave NaN; scale <= 0 was accepted; float64 was refused without
    a reason."""
    with pytest.raises(ValueError, match="anchors must have at least one row"):
        sf.info_nce(torch.randn(0, 8), torch.randn(3, 8))
    for scale in (0.0, -20.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a positive, finite number"):
            sf.info_nce(torch.randn(4, 8), torch.randn(4, 8), scale=scale)
    learnable = torch.tensor(-1.0, requires_grad=True)  # a tensor scale is the caller's
    assert sf.info_nce(torch.randn(4, 8), torch.randn(4, 8), scale=learnable).isfinite()
    with pytest.raises(TypeError, match=r"float64: the fused kernels .* simcse_fast\.reference"):
        sf.info_nce(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))


def test_resume_and_overwrite_exclude_each_other(tiny_bert_dir, sixteen_sentences_file, tmp_path):
    with pytest.raises(ValueError, match="pick one"):
        training.train(
            dataclasses.replace(
                config(tiny_bert_dir, sixteen_sentences_file, tmp_path), resume=True, overwrite=True
            )
        )


def test_an_uncached_hub_model_fails_fast_offline(sixteen_sentences_file, tmp_path, monkeypatch, capsys):
    """Finding 5: offline, a hub name that is not cached retried for 38 s before failing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    code = cli.main([
        "train", str(sixteen_sentences_file), "--model", "no-such-owner/no-such-model",
        "--output", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and time.perf_counter() - started < 10
    assert err.count("\n") == 0 and "neither a local folder nor in the Hugging Face cache" in err
