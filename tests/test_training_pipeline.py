"""``simcse-fast train`` keeps the device busy: batches tokenized ahead in a thread in the order of
before, a step that reads nothing back from the device between the loss reads every
``--log-steps`` steps, non-blocking copies, ``--compile`` (few shapes, compile time apart) and
``--packed`` (packed batches through a varlen attention, refused where there is none), and the
speed in the bar and the summary."""

from __future__ import annotations

import functools
import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from inputs import SENTENCES, model_weights, stop_after_checkpoint, training_config
from syncs import AsyncCopy, HostSyncRecorder, Sync
from torch.utils._python_dispatch import TorchDispatchMode

import simcse_fast as sf
from simcse_fast import batching, cli, training

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


config = functools.partial(training_config, max_seq_length=16, max_steps=4, checkpoint_steps=4, mlp_head=True)


# The order of batches.


def old_order(sentences: int, batch_size: int, seed: int, total: int, start: dict, rank: int, world: int):
    """The batches as the training loop drew them before they were prepared ahead (its code)."""
    position, found = dict(start), []
    steps_per_epoch = math.ceil(sentences / batch_size)
    while position["step"] < total:
        order = torch.randperm(sentences, generator=torch.Generator().manual_seed(seed + position["epoch"]))
        while position["batch"] < steps_per_epoch and position["step"] < total:
            indices = order[position["batch"] * batch_size : (position["batch"] + 1) * batch_size]
            position["batch"] += 1
            usable = len(indices) - len(indices) % world
            if usable < 2:
                found.append((position["epoch"], position["batch"], None))
                continue
            share = usable // world
            taken = indices[rank * share : (rank + 1) * share].tolist()
            found.append((position["epoch"], position["batch"], taken))
            position["step"] += 1
        if position["batch"] >= steps_per_epoch:
            position = {"epoch": position["epoch"] + 1, "batch": 0, "step": position["step"]}
    return found


@pytest.mark.parametrize(
    "sentences, batch_size, world, start",
    [
        (16, 4, 1, {"epoch": 0, "batch": 0, "step": 0}),
        (17, 4, 1, {"epoch": 0, "batch": 0, "step": 0}),  # a last batch of one sentence: skipped
        (19, 6, 2, {"epoch": 0, "batch": 0, "step": 0}),  # an odd last batch: shares of 0 and 1
        (17, 4, 1, {"epoch": 1, "batch": 2, "step": 7}),  # resumed mid-epoch
        (16, 4, 2, {"epoch": 0, "batch": 4, "step": 4}),  # resumed after an epoch's last step
    ],
)
def test_batches_come_in_the_order_of_before(sentences, batch_size, world, start):
    for rank in range(world):
        expected = old_order(sentences, batch_size, 3, 11, start, rank, world)
        plan = batching.batch_plan(sentences, batch_size, 3, 11, start, rank, world)
        assert [(p.epoch, p.batch, p.indices) for p in plan] == expected


def test_the_prefetcher_keeps_order_raises_in_the_consumer_and_stops():
    with batching.Prefetcher(range(20), lambda item: item * item, depth=2) as prefetched:
        assert list(prefetched) == [(item, item * item) for item in range(20)]

    def failing(item):
        if item == 3:
            raise RuntimeError("tokenizer failed")
        return item

    with batching.Prefetcher(range(10), failing) as prefetched:
        assert [next(prefetched)[0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(RuntimeError, match="tokenizer failed"):
            next(prefetched)
    endless = batching.Prefetcher(iter(int, 1), lambda item: item, depth=1)  # a full queue blocks it
    next(endless)
    endless.close()
    assert not any(thread.name == "simcse-fast-prefetch" for thread in threading.enumerate())


class CopyRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.copies.append(kwargs)
        return func(*args, **(kwargs or {}))


def test_a_batch_is_copied_without_blocking_once_per_tensor(tiny_bert_dir):
    """Pinned memory for a GPU only; the copy is ``non_blocking`` (shown with the meta device)."""
    model = sf.SimCSE(str(tiny_bert_dir), max_seq_length=16, device="cpu")
    packed_config = config(tiny_bert_dir, "", "", packed=True)
    assert training.tokenization(model, packed_config).pin is False
    batch = training.tokenization(model, packed_config)(SENTENCES[:3], 3)
    with CopyRecorder() as recorder:
        moved = batch.to(torch.device("meta"))
    assert len(recorder.copies) == 3  # ids, positions, offsets (shared by q and k)
    assert all(copy["non_blocking"] and copy["device"] == torch.device("meta") for copy in recorder.copies)
    assert moved.parts[0]["cu_seq_lens_q"] is moved.parts[0]["cu_seq_lens_k"]
    assert moved.parts[0]["max_length_q"] == max(len(model.tokenizer(s)["input_ids"]) for s in SENTENCES[:3])


def test_static_widths_pad_to_few_buckets(tiny_bert_dir):
    assert batching.bucket_widths(32) == [32]
    assert batching.bucket_widths(64) == [64]
    assert batching.bucket_widths(300) == [64, 128, 256, 300]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    words = "the cat sat on the mat and a dog ran by the big red car on the road"
    sentences = [" ".join(words.split()[:length]) for length in (3, 9, 17)]
    padded = batching.Tokenization(tokenizer, 300, static_widths=True, mini_batch_size=2)(sentences, 3)
    assert padded.rows == [2, 2, 2]  # six rows: the batch twice
    assert [part["input_ids"].shape[1] for part in padded.parts] == [64, 64, 64]
    plain = batching.Tokenization(tokenizer, 300, mini_batch_size=2)(sentences, 3)
    assert [part["input_ids"].shape[1] for part in plain.parts] == [11, 19, 19]  # each cut to its longest
    for static, cut in zip(padded.parts, plain.parts, strict=True):
        width = cut["input_ids"].shape[1]
        assert torch.equal(static["input_ids"][:, :width], cut["input_ids"])
        assert not static["attention_mask"][:, width:].any()


# No host synchronization in a step.


def record_training(monkeypatch, run_config) -> tuple[list, dict]:
    """Train under a :class:`HostSyncRecorder`, with a marker where each step begins and where
    the loss is read; returns the events cut at the steps' beginnings, and the summary."""
    recorder = HostSyncRecorder()
    begin, read = training._Progress.begin, training._Progress.read

    def marked_begin(progress):
        recorder.mark("begin")
        return begin(progress)

    def marked_read(progress):
        recorder.mark("read")
        return read(progress)

    monkeypatch.setattr(training._Progress, "begin", marked_begin)
    monkeypatch.setattr(training._Progress, "read", marked_read)
    with recorder:
        summary = training.train(run_config)
    monkeypatch.undo()
    steps, current = [], None
    for event in recorder.events:
        if event == "begin":
            current = []
            steps.append(current)
        elif current is not None:
            current.append(event)
    return steps, summary


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mini_batch_size", [None, 3], ids=["plain", "cached"])
def test_a_step_reads_nothing_back_between_log_steps(
    tiny_bert_dir, sixteen_sentences_file, tmp_path, monkeypatch, device, mini_batch_size
):
    """Seven steps (two epochs of 16 sentences in batches of 4, less one), the loss read every 3:
    no call of simcse_fast's (or of PyTorch's on its behalf: the optimizer, clipping) waits for
    the device or copies to it from the host, apart from the read's one and the batch's copy
    from pinned memory; transformers' own attention-mask code (one read per forward, skipped
    under torch.compile) is all that remains."""
    run = config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run", max_steps=7, epochs=2, log_steps=3,
                 checkpoint_steps=100, mini_batch_size=mini_batch_size, device=device,
                 show_progress_bar=True)  # fmt: skip
    steps, summary = record_training(monkeypatch, run)
    assert len(steps) == 7 and summary["steps"] == 7
    reads = [index + 1 for index, events in enumerate(steps) if "read" in events]
    assert reads == [3, 6, 7]
    forwards = 1 if mini_batch_size is None else 2 * 3  # 8 rows in mini-batches of 3: twice each
    for index, events in enumerate(steps, start=1):
        if index in reads:
            events = events[: events.index("read")]
        syncs = [event for event in events if isinstance(event, Sync)]
        ours = [sync for sync in syncs if sync.package != "transformers"]
        assert ours == [], f"step {index}: {ours}"
        # transformers 5 reads the mask once per forward, 4.57 also copies a constant to the device
        assert len(syncs) <= 2 * forwards and all("mask" in sync.where for sync in syncs), syncs
        copies = [event.where for event in events if isinstance(event, AsyncCopy)]
        assert all("batching.py" in where for where in copies)  # the batch's, pinned (on a GPU)
    assert 0 < summary["outside_encoder"] < 1 and summary["sentences"] == 7 * 4 and summary["seconds"] > 0


def test_the_recorder_sees_what_the_plain_optimizer_reads(
    tiny_bert_dir, sixteen_sentences_file, tmp_path, monkeypatch
):
    """The check above has teeth: PyTorch's default AdamW on a CPU reads each parameter's step
    counter back (the fused one keeps them on the device)."""
    monkeypatch.setattr(
        training, "new_optimizer", lambda model, run: torch.optim.AdamW(model.parameters(), lr=run.lr)
    )
    steps, _ = record_training(monkeypatch, config(tiny_bert_dir, sixteen_sentences_file, tmp_path / "run",
                                                   max_steps=2, log_steps=5))  # fmt: skip
    ours = [event for event in steps[0] if isinstance(event, Sync) and event.package == "simcse_fast"]
    assert ours and all("__call__" in event.where for event in ours)


def test_the_optimizer_is_fused_and_keeps_it_on_resume(tiny_bert_dir):
    model = sf.SimCSE(str(tiny_bert_dir), device="cpu")
    optimizer = training.new_optimizer(model, config(tiny_bert_dir, "", ""))
    assert optimizer.param_groups[0]["fused"] is True
    plain = torch.optim.AdamW(model.parameters())
    model(model.tokenize(SENTENCES)).sum().backward()
    plain.step()
    training._load_optimizer_state(optimizer, plain.state_dict())
    assert optimizer.param_groups[0]["fused"] is True
    assert all(state["step"].dtype == torch.float32 for state in optimizer.state.values())


# --compile


@pytest.fixture
def traced_compile(monkeypatch):
    """``torch.compile`` with Dynamo's graph capture only (the captured graph runs eagerly):
    seconds instead of Inductor's minutes on a CPU, the same shapes and recompiles."""
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("traced_compile")
def test_compile_trains_compiles_once_and_resumes_bitwise(tiny_bert_dir, sixteen_sentences_file, tmp_path,
                                                          monkeypatch, capsys):  # fmt: skip
    """17 sentences in batches of 4 (the last of each epoch holds one and is skipped), 10 steps
    of gradient-cached mini-batches of 3 and 2 rows, at the one width of max_seq_length 16:
    compiled once without and once with autograd. The compile time is reported apart, and a
    stopped run resumes to the uninterrupted one's weights."""
    sixteen_sentences_file.write_text(sixteen_sentences_file.read_text() + "one more sentence\n")
    arguments = ["train", str(sixteen_sentences_file), "--model", str(tiny_bert_dir), "--output",
                 str(tmp_path / "straight"), "--batch-size", "4", "--max-seq-length", "16", "--epochs", "2",
                 "--lr", "1e-3", "--device", "cpu", "--no-progress", "--compile",
                 "--mini-batch-size", "3"]  # fmt: skip
    graphs = []
    runner_init = training.StepRunner.__init__

    def counting_runner(runner, *args, **kwargs):
        runner_init(runner, *args, **kwargs)
        graphs.append(runner)

    monkeypatch.setattr(training.StepRunner, "__init__", counting_runner)
    assert cli.main(arguments) == 0
    out = capsys.readouterr().out
    assert "trained 10 steps" in out and "; compiling the encoder took" in out
    assert graphs[0].compiled_graphs == 2
    stopped = [*arguments[:5], str(tmp_path / "resumed"), *arguments[6:], "--checkpoint-steps", "4"]
    with pytest.MonkeyPatch.context() as stopping:
        stop_after_checkpoint(stopping, 4)
        assert cli.main(stopped) == 130  # interrupted after the checkpoint of step 4
    assert cli.main([*stopped, "--resume"]) == 0
    straight, resumed = model_weights(tmp_path / "straight"), model_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.gpu
def test_compiled_dropout_replays_exactly(tiny_bert_dir):
    """Gradient caching under Inductor: a mini-batch's replay with autograd draws the dropout
    masks of its first pass without autograd (another graph)."""
    torch._dynamo.reset()
    model = sf.SimCSE(str(tiny_bert_dir), device="cuda")
    model.train()
    encoder = training._CompiledEncoder(model.encoder, eager_random=True)
    features = model.tokenize(SENTENCES)
    state = torch.cuda.get_rng_state()
    with torch.no_grad():
        first = model(features, encoder=encoder)
    torch.cuda.set_rng_state(state)
    replay = model(features, encoder=encoder)
    assert encoder.graphs == 2 and torch.equal(first, replay.detach())


# --packed


@pytest.mark.parametrize(
    "options, message",
    [
        (["--packed"], "--packed needs a varlen attention, flash-attention's (pip install flash-attn"),
        (["--packed", "--compile"], "--packed and --compile do not go together"),
        (["--log-steps", "0"], "--log-steps must be a positive integer; got 0"),
    ],
)
def test_packed_is_refused_where_it_cannot_run(tiny_bert_dir, sixteen_sentences_file, tmp_path, capsys,
                                               options, message):  # fmt: skip
    if "flash_attn" in training.PACKED_ATTENTION and training.packed_attention_missing() is None:
        pytest.skip("flash-attn is installed here")
    code = cli.main(["train", str(sixteen_sentences_file), "--model", str(tiny_bert_dir), "--output",
                     str(tmp_path / "run"), "--device", "cpu", *options])  # fmt: skip
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith(f"simcse-fast: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_packed_needs_a_gpu_with_bf16(monkeypatch):
    monkeypatch.setattr(training, "packed_attention_missing", lambda: None)
    assert "on a CUDA GPU; the device here is cpu" in training.packed_attention_problem(torch.device("cpu"))


VARLEN = "simcse_fast_test_varlen"


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's varlen semantics in PyTorch: each packed sequence attends to itself."""
    assert attention_mask is None and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert isinstance(kwargs["max_length_q"], int)
    offsets = kwargs["cu_seq_lens_q"].tolist()
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale=scaling, dropout_p=dropout
        )
        for a, b in itertools.pairwise(offsets)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture
def varlen_here(monkeypatch):
    """A varlen attention that runs on a CPU, in place of flash-attention's."""
    interfaces = pytest.importorskip("transformers.masking_utils")
    if not hasattr(interfaces, "AttentionMaskInterface") or not getattr(
        transformers.BertModel, "_supports_flash_attn", False
    ):
        pytest.skip("this transformers release has no varlen attention for BERT")
    transformers.AttentionInterface.register(VARLEN, varlen_attention)
    flash_mask = interfaces.ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"]
    interfaces.AttentionMaskInterface.register(VARLEN, flash_mask)
    monkeypatch.setattr(training, "PACKED_ATTENTION", VARLEN)
    monkeypatch.setattr(training, "packed_attention_problem", lambda device: None)


@pytest.fixture(scope="module")
def tiny_roberta_dir(tiny_bert_dir, tmp_path_factory):
    """A tiny RoBERTa (positions counted from the padding id + 1) with the tiny BERT's vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-roberta")
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    roberta = transformers.RobertaConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, type_vocab_size=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RobertaModel(roberta).save_pretrained(folder)
    return folder


@pytest.mark.usefixtures("varlen_here")
@pytest.mark.parametrize("architecture", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_packed_sentences_embed_as_padded_ones(tiny_bert_dir, tiny_roberta_dir, architecture, pooling):
    """The packed layout (positions restarting per sentence, RoBERTa's from the padding id + 1)
    through a varlen attention and packed pooling gives the padded batch's embeddings."""
    folder = tiny_bert_dir if architecture == "bert" else tiny_roberta_dir
    model = training.load_model(config(folder, "", "", packed=True, pooling=pooling, mlp_head=False), "cpu")
    model.eval()
    packed = training.tokenization(model, config(folder, "", "", packed=True))(SENTENCES, len(SENTENCES))
    with training._attention(model, "sdpa"):
        padded = model(model.tokenize(SENTENCES + SENTENCES))
    torch.testing.assert_close(model(packed.parts[0]), padded, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("varlen_here")
def test_packed_training_equals_padded_training(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path):
    """Dropout off, gradient caching in mini-batches of 3 rows: packed and padded runs train the
    same weights, with dev evaluation through PyTorch's attention in between."""
    dev = tmp_path / "dev.tsv"
    dev.write_text("".join(f"g\tf\t2020\t{i}\t{i % 5}.0\t{a}\t{b}\n" for i, (a, b) in
                           enumerate(zip(SENTENCES, SENTENCES[::-1], strict=True))))  # fmt: skip
    common = {"mini_batch_size": 3, "dev_sts": str(dev), "checkpoint_steps": 2}
    training.train(config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "padded", **common))
    training.train(config(tiny_bert_without_dropout, sixteen_sentences_file, tmp_path / "packed", packed=True,
                          **common))  # fmt: skip
    padded, packed = model_weights(tmp_path / "padded"), model_weights(tmp_path / "packed")
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-5, msg=name)
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "packed")
    assert getattr(saved, "_attn_implementation", None) != VARLEN
