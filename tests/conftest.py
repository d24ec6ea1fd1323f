"""Test setup: without a CUDA device the Triton kernels run under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so it is set here, before any
test module imports simcse_fast. On a machine with a GPU the kernels run for real and the
tests marked ``gpu`` run too.
"""

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import simcse_fast._triton as triton_support

SEED = int(os.environ.get("SIMCSE_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return (
        f"simcse_fast tests: random seed {SEED} (SIMCSE_FAST_TEST_SEED={SEED} repeats this run); "
        f"Triton interpreter {'on' if triton_support.TRITON_INTERPRETER else 'off'}"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def generator(request) -> torch.Generator:
    """A CPU generator seeded from the run's seed and the test's id: fresh inputs every run,
    reproducible with SIMCSE_FAST_TEST_SEED."""
    return torch.Generator().manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))


WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue house tree car road sun moon and by".split()
)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT (hidden size 32) with a WordPiece vocabulary written here, saved as a
    Hugging Face model folder: no download."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_without_dropout(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with dropout off: training is then deterministic however it is batched."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model = transformers.BertModel.from_pretrained(tiny_bert_dir)
    model.config.hidden_dropout_prob = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def sixteen_sentences_file(tmp_path):
    """Sixteen sentences in the tiny BERT's vocabulary, one per line: four batches of four."""
    from inputs import SENTENCES

    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES + [s + " by the tree" for s in SENTENCES]) + "\n")
    return path
