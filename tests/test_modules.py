"""sf.InfoNCELoss: the module equals sf.info_nce, a learnable scale gets its gradient and is
clamped like CLIP's, bad arguments are refused by name."""

from __future__ import annotations

import math

import pytest
import readme
import torch
from inputs import SENTENCES

import simcse_fast as sf
from simcse_fast import reference


def test_module_equals_the_function(generator):
    anchors = torch.randn(6, 16, generator=generator)
    candidates = torch.randn(9, 16, generator=generator)
    labels = torch.randint(0, 9, (6,), generator=generator)
    for options in ({}, {"reduction": "none"}, {"reduction": "sum"}):
        module = sf.InfoNCELoss(scale=10.0, **options)
        torch.testing.assert_close(
            module(anchors, candidates, labels),
            sf.info_nce(anchors, candidates, labels=labels, scale=10.0, **options),
        )
    symmetric = sf.InfoNCELoss(symmetric=True)(anchors, candidates[:6])
    torch.testing.assert_close(symmetric, reference.info_nce(anchors, candidates[:6], symmetric=True))


def test_learnable_scale_gets_the_reference_gradient(generator):
    anchors = torch.randn(6, 16, generator=generator)
    candidates = torch.randn(6, 16, generator=generator)
    module = sf.InfoNCELoss(scale=14.0, learnable_scale=True)
    assert [name for name, _ in module.named_parameters()] == ["log_scale"]
    module(anchors, candidates).backward()
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    reference.info_nce(anchors.double(), candidates.double(), scale=scale).backward()
    # d loss / d log_scale = scale * d loss / d scale
    torch.testing.assert_close(module.log_scale.grad.double(), 14.0 * scale.grad, rtol=1e-5, atol=1e-6)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.step()
    assert module.log_scale.item() != pytest.approx(math.log(14.0))


def test_learnable_scale_is_clamped_at_100(generator):
    module = sf.InfoNCELoss(scale=50.0, learnable_scale=True)
    with torch.no_grad():
        module.log_scale.fill_(math.log(1000.0))
    assert module.scale.item() == pytest.approx(100.0)
    anchors, candidates = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    torch.testing.assert_close(module(anchors, candidates), sf.info_nce(anchors, candidates, scale=100.0))


def test_state_dict_round_trip_and_repr():
    module = sf.InfoNCELoss(scale=30.0, learnable_scale=True, symmetric=True)
    copy = sf.InfoNCELoss(learnable_scale=True, symmetric=True)
    copy.load_state_dict(module.state_dict())
    assert copy.scale.item() == pytest.approx(30.0)
    assert "learnable, now 30" in repr(module) and "symmetric=True" in repr(module)
    assert sf.InfoNCELoss().state_dict() == {}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"scale": 0.0}, ValueError, "scale must be a positive"),
        ({"scale": float("nan")}, ValueError, "scale must be a positive"),
        ({"scale": "20"}, TypeError, "scale must be a float"),
        ({"scale": 200.0, "learnable_scale": True}, ValueError, "starts at most at 100"),
        ({"symmetric": 1}, TypeError, "symmetric must be a bool"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        sf.InfoNCELoss(**kwargs)


def tiny_encoder(tiny_bert_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModel.from_pretrained(tiny_bert_dir), transformers.AutoTokenizer.from_pretrained(
        tiny_bert_dir
    )


def test_readme_training_loop_runs(tiny_bert_dir):
    """The README's own training loop, with a SimCSE encoder (tokenized batch -> embeddings) and
    two batches as the stand-ins it assumes."""
    encoder = sf.SimCSE(str(tiny_bert_dir), device="cpu")
    before = [p.detach().clone() for p in encoder.parameters()]
    loader = [
        (encoder.tokenize(SENTENCES[:4]), encoder.tokenize(SENTENCES[4:])),
        (encoder.tokenize(SENTENCES[::2]), encoder.tokenize(SENTENCES[1::2])),
    ]
    namespace = readme.run_python(
        "own-training-loop", {'.to("cuda")': '.to("cpu")'}, {"encoder": encoder, "loader": loader}
    )
    assert (
        namespace["loss"].isfinite() and namespace["criterion"].log_scale.grad is None
    )  # zeroed after the step
    assert namespace["criterion"].scale.item() != pytest.approx(20.0)  # the scale was trained
    changed = [not torch.equal(b, p) for b, p in zip(before, encoder.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_readme_trainer_override_runs(tiny_bert_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    encoder, tokenizer = tiny_encoder(tiny_bert_dir)
    columns = {}
    for prefix, sentences in (("anchor_", SENTENCES), ("positive_", SENTENCES[::-1])):
        tokens = tokenizer(sentences, padding="max_length", max_length=12)
        columns.update({prefix + key: value for key, value in tokens.items()})
    namespace = readme.run_python("hf-trainer")
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        remove_unused_columns=False, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    before = encoder.embeddings.word_embeddings.weight.detach().clone()
    trainer = namespace["ContrastiveTrainer"](
        model=encoder, args=arguments, train_dataset=datasets.Dataset.from_dict(columns)
    )
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert not torch.equal(before, encoder.embeddings.word_embeddings.weight)
