"""Every code block of README.md runs in a test, or ``NOT_RUN`` says why it cannot.

Blocks are named in README.md (``<!-- test: NAME -->`` above the fence) and run through
``tests/readme.py`` (its docstring says how to add one). Hub models are replaced by the tiny
local BERT of ``conftest.tiny_bert_dir``, ``"cuda"`` by ``"cpu"``, and the names a block assumes
(``encoder``, ``loader``, input files) are stand-ins defined here. The sentence-transformers
blocks run in ``tests/test_sentence_transformers.py`` (which CI also runs with the oldest
supported release), the training-loop ones in ``tests/test_modules.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import readme
import torch
from inputs import SENTENCES

import simcse_fast as sf
from simcse_fast import cli, training

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = {
    "install": "creates a virtual environment and installs packages (minutes, a network); CI does the "
    "same install in a fresh environment (.ci/run) and tests the built packages (.ci/package)",
    "benchmark": "installs packages, then benchmarks for about a minute; tests/test_bench.py runs "
    "`simcse-fast bench --quick` on reduced sizes",
    "tests": "installs packages and runs the whole suite: it is CI itself (.ci/run)",
    "e2e": "runs the e2e tests (real weights, the STS files), which CI's pytest run includes",
    "gpu-check": "needs an NVIDIA GPU and installs the checkout; tests/test_gpu_check.py runs the same "
    "script with --dry-run on the CPU",
}
"""README blocks no test runs, each with the reason."""
CALL = re.compile(r"\breadme\.\w+\(\s*\"([a-z0-9][a-z0-9-]*)\"")


def test_every_readme_block_is_run_or_excused():
    names = [block.name for block in readme.blocks()]
    unnamed = [f"README.md:{block.line}" for block in readme.blocks() if block.name is None]
    assert not unnamed, (
        f"code blocks without a name: {', '.join(unnamed)}. Put <!-- test: NAME --> on the line above "
        "each, and run it in a test through tests/readme.py or list it in NOT_RUN with the reason"
    )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"README block names used twice: {duplicates}"
    run = {name for path in Path(__file__).parent.glob("*.py") for name in CALL.findall(path.read_text())}
    untested = [name for name in names if name not in run and name not in NOT_RUN]
    assert not untested, f"README blocks that no test runs and NOT_RUN does not excuse: {untested}"
    assert not set(names) & run & set(NOT_RUN), "a block both run and in NOT_RUN"
    stale = sorted((run | set(NOT_RUN)) - set(names))
    assert not stale, f"tests or NOT_RUN entries name blocks README.md no longer has: {stale}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_sts(path: Path) -> Path:
    """Eight STS pairs in the tiny BERT's vocabulary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = zip(SENTENCES, SENTENCES[::-1], strict=True)
    path.write_text("".join(f"g\tf\t2020\t{i}\t{i % 5}.0\t{a}\t{b}\n" for i, (a, b) in enumerate(pairs)))
    return path


def test_quick_start_trains_and_evaluates(tiny_bert_dir, in_tmp):
    (in_tmp / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    write_sts(in_tmp / "stsbenchmark" / "sts-test.csv")
    train, evaluate = readme.command_lines("train-quick-start")
    result = readme.run_simcse_fast(train, {"distilroberta-base": str(tiny_bert_dir)})
    assert result.code == 0, result.err
    assert "trained 1 steps" in result.out and (in_tmp / "simcse-model" / "modules.json").exists()
    result = readme.run_simcse_fast(evaluate)
    assert result.code == 0 and "8 pairs, Spearman x100 of cosine similarity" in result.out, result.err


def option_actions(command: str) -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    cli.COMMANDS[command][1](parser)
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_the_train_synopsis_matches_the_command():
    """Each option the synopsis shows exists, and each default it shows is the command's."""
    checked = 0
    for line in readme.command_lines("train-synopsis"):
        words = line.split(" --no-python ")[-1]
        program, command = words.split()[:2]
        assert program == "simcse-fast"
        actions = option_actions(command)
        optional = re.findall(r"\[([^\]]*)\]", words)
        for alternative in (part.strip() for group in optional for part in group.split("|")):
            flag, *value = alternative.split()
            action = actions[flag]
            if value and action.default is not None and not value[0].isupper():
                assert (action.type or str)(value[0]) == action.default, (
                    f"{flag}: README {value[0]}, default {action.default}"
                )
                checked += 1
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", re.sub(r"\[[^\]]*\]", "", words)):
            assert flag in actions, f"{command} has no option {flag}"
    assert checked >= 8


def numbers_as_n(line: str) -> str:
    return re.sub(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", "N", line.strip())


def test_the_train_transcript(tiny_bert_dir, in_tmp, monkeypatch):
    """The transcript's commands, run on 256 sentences (4 steps of 64) from the tiny BERT, print
    the lines it shows (numbers aside); ``^C`` is a SIGINT during the command's first step."""
    (in_tmp / "wiki1m.txt").write_text("\n".join(f"{s} {i}" for i in range(32) for s in SENTENCES) + "\n")
    monkeypatch.setitem(cli.TRAINING_DEFAULTS, "model", str(tiny_bert_dir))
    info_nce = training.functional.info_nce

    def interrupted_once(*args, **kwargs):
        monkeypatch.setattr(training.functional, "info_nce", info_nce)
        os.kill(os.getpid(), signal.SIGINT)
        return info_nce(*args, **kwargs)

    for command, shown, interrupted in readme.transcript("train-transcript"):
        if interrupted:
            monkeypatch.setattr(training.functional, "info_nce", interrupted_once)
        result = readme.run_simcse_fast(command)
        printed = {numbers_as_n(line) for line in (result.out + result.err).splitlines()}
        for line in shown:
            assert numbers_as_n(line) in printed, (
                f"{command}: no line like {line!r} in\n{result.out}{result.err}"
            )
        failed = any(line.startswith("simcse-fast: error:") for line in shown)
        assert result.code == (130 if interrupted else 1 if failed else 0), (command, result.err)


def test_loading_a_trained_model(tiny_bert_dir, in_tmp):
    sf.SimCSE(str(tiny_bert_dir), device="cpu").save(in_tmp / "simcse-model")
    namespace = readme.run_python("load-trained-model")
    embeddings = namespace["embeddings"]
    assert embeddings.shape == (3, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, namespace["same"], rtol=1e-5, atol=1e-5)


def test_the_api_example():
    generator = torch.Generator().manual_seed(0)
    stand_ins = {
        "anchors": torch.randn(8, 16, generator=generator),
        "candidates": torch.randn(12, 16, generator=generator),
    }
    namespace = readme.run_python("api", {'device="cuda"': 'device="cpu"'}, stand_ins)
    sentences, embeddings = namespace["sentences"], namespace["token_embeddings"]
    assert sentences.shape == (32, 768) and sentences.dtype == torch.bfloat16
    assert embeddings.grad is not None and embeddings.grad[:, 100:].abs().sum() == 0


def test_the_layout_lists_every_module():
    listed = [line.split()[0] for line in readme.block("layout").text.splitlines() if line.strip()]
    missing = [path for path in listed if not (ROOT / path).exists()]
    assert not missing, f"the README's layout lists paths that do not exist: {missing}"
    package = ROOT / "simcse_fast"
    modules = [
        f"simcse_fast/{path.name}" + ("/" if path.is_dir() else "")
        for path in sorted(package.iterdir())
        if not path.name.startswith("_") and (path.suffix == ".py" or (path / "__init__.py").exists())
    ]
    assert not [module for module in modules if module not in listed], (
        f"unlisted: {set(modules) - set(listed)}"
    )
