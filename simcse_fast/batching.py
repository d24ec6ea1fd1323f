"""The training command's input pipeline: which sentences each step trains on, tokenized ahead of
the device in a background thread.

Order: epoch ``e`` visits the sentences in a permutation seeded by ``seed + e``, in batches of
``batch_size``; under torchrun each process takes its equal share of every batch. A batch is
tokenized once and doubled (rows ``i`` and ``B + i`` are the same sentence, dropout makes the
two views), cut into mini-batches for gradient caching (else one part) and, for a GPU, put in
page-locked (pinned) memory, so that its copy to the device (``non_blocking=True``) neither
waits for the host nor makes the host wait. Everything a step needs to know about its batch
(widths, row ranges, packed offsets and lengths) is computed here, on the host: nothing of a
batch is read back from the device.

Layouts of a part (the encoder's keyword arguments):

- padded: ``input_ids``, ``attention_mask`` (and ``token_type_ids``) ``(rows, width)``, right
  padding to the longest row of the part; with static widths (``torch.compile``) to the
  smallest of a few bucket widths (:func:`bucket_widths`), so that the compiler sees few shapes.
- packed (varlen attention): ``input_ids`` and ``position_ids`` ``(1, T)``, the rows'
  tokens back to back without padding, ``cu_seq_lens_q``/``cu_seq_lens_k`` ``(rows + 1,)``
  int32 offsets and ``max_length_q``/``max_length_k`` the longest row (a Python int: the
  attention reads it without a device read), as flash-attention's varlen functions and
  Hugging Face's flash-attention integration take them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

PACKED_OFFSETS = "cu_seq_lens_q"
"""The feature that marks a packed part: its sequence offsets."""


@dataclasses.dataclass
class Batch:
    """One step's input: the tokenized parts (the whole batch, or its mini-batches) with the
    row count of each, and the number of sentences of the global batch (all processes)."""

    parts: list[dict]
    rows: list[int]
    sentences: int

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``: each tensor copied without blocking (from pinned memory on a
        GPU, so the copy overlaps the device's work), once even where two features share it."""
        moved: dict[int, Tensor] = {}

        def move(value):
            if not isinstance(value, Tensor):
                return value
            if id(value) not in moved:
                moved[id(value)] = value.to(device, non_blocking=True)
            return moved[id(value)]

        parts = [{name: move(value) for name, value in part.items()} for part in self.parts]
        return Batch(parts, self.rows, self.sentences)


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """A batch of the order: its epoch, the batches of that epoch consumed once it is taken
    (the data position a checkpoint records), this process's sentence indices and the
    sentences of the global batch. ``indices`` is None for a batch too small to train on (the
    last of an epoch can hold a single sentence, which has no negatives): it is skipped."""

    epoch: int
    batch: int
    indices: list[int] | None
    sentences: int


def batch_plan(
    sentences: int, batch_size: int, seed: int, total_steps: int, start: dict, rank: int = 0, world: int = 1
) -> Iterator[PlannedBatch]:
    """The batches from data position ``start`` (``{"epoch", "batch", "step"}``) until
    ``total_steps`` steps are done. Every process takes an equal share of each batch (the last
    batch of an epoch may lose up to ``world - 1`` sentences)."""
    steps_per_epoch = math.ceil(sentences / batch_size)
    epoch, batch, step = start["epoch"], start["batch"], start["step"]
    while step < total_steps:
        order = torch.randperm(sentences, generator=torch.Generator().manual_seed(seed + epoch))
        while batch < steps_per_epoch and step < total_steps:
            indices = order[batch * batch_size : (batch + 1) * batch_size]
            batch += 1
            usable = len(indices) - len(indices) % world
            if usable < 2:
                yield PlannedBatch(epoch, batch, None, 0)
                continue
            share = usable // world
            yield PlannedBatch(epoch, batch, indices[rank * share : (rank + 1) * share].tolist(), usable)
            step += 1
        if batch >= steps_per_epoch:
            epoch, batch = epoch + 1, 0


def bucket_widths(max_length: int) -> list[int]:
    """The widths a batch is padded to when shapes must stay few (``torch.compile``): powers of
    two from 64 below ``max_length``, then ``max_length`` (just ``max_length`` up to 64 tokens,
    SimCSE's 32 included), so padding stays under half of a batch's longest row beyond 64."""
    return [width for width in (64 << k for k in range(16)) if width < max_length] + [max_length]


def used_lengths(attention_mask: Tensor) -> Tensor:
    """Per row, one past the last present position (the length for right padding)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return ((attention_mask != 0) * positions).amax(dim=1)


def row_ranges(lengths: list[int], mini_batch_size=None, mini_batch_tokens=None) -> list[slice]:
    """Contiguous ranges of rows of the given ``lengths``: at most ``mini_batch_size`` rows, and
    rows x (their longest length) at most ``mini_batch_tokens`` (a range holds at least one row
    whatever the budget); one range when both are None."""
    rows = len(lengths)
    if mini_batch_size is None and mini_batch_tokens is None:
        return [slice(0, rows)]
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


def mini_batches(attention_mask: Tensor, mini_batch_size=None, mini_batch_tokens=None) -> list[slice]:
    """:func:`row_ranges` of a tokenized batch (rows' lengths from its ``attention_mask``)."""
    if mini_batch_size is None and mini_batch_tokens is None:
        return [slice(0, attention_mask.shape[0])]
    return row_ranges(used_lengths(attention_mask).tolist(), mini_batch_size, mini_batch_tokens)


def rows_of(features: dict, rows: slice) -> dict:
    """The features of ``rows`` without the trailing columns that are padding in all of them
    (leading ones stay: removing them would shift the position ids of left-padded rows)."""
    width = max(1, int(used_lengths(features["attention_mask"][rows]).max()))
    return {name: tensor[rows, :width] for name, tensor in features.items()}


class Tokenization:
    """Sentences to a :class:`Batch` of ``parts``, on the host.

    ``tokenizer``: a Hugging Face tokenizer, copied (a fast tokenizer is not safe to call from
    two threads, and the model's keeps serving evaluation). ``max_length``: tokens kept per
    sentence. ``static_widths``: pad to :func:`bucket_widths` instead of the longest row.
    ``packed``: the packed layout, with ``position_offset`` added to each row's positions
    (RoBERTa-style encoders count from the padding id + 1). ``pin``: page-locked tensors.
    ``mini_batch_size``/``mini_batch_tokens``: the gradient-caching parts (:func:`row_ranges`).
    """

    def __init__(self, tokenizer, max_length: int, *, static_widths: bool = False, packed: bool = False,
                 position_offset: int = 0, pin: bool = False, mini_batch_size: int | None = None,
                 mini_batch_tokens: int | None = None):  # fmt: skip
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_length = max_length
        self.widths = bucket_widths(max_length) if static_widths else None
        self.packed, self.position_offset, self.pin = packed, position_offset, pin
        self.budget = (mini_batch_size, mini_batch_tokens)

    def __call__(self, sentences: list[str], global_sentences: int) -> Batch:
        """The parts of the doubled batch of ``sentences`` (this process's share of a global
        batch of ``global_sentences``)."""
        if self.packed:
            parts, rows = self._packed(sentences)
        else:
            parts, rows = self._padded(sentences)
        if self.pin:
            parts = [{name: _pinned(value) for name, value in part.items()} for part in parts]
        return Batch(parts, rows, global_sentences)

    def _padded(self, sentences: list[str]) -> tuple[list[dict], list[int]]:
        # As numpy arrays: transformers builds those faster than tensors, which then share them.
        encoded = self.tokenizer(
            sentences, padding="max_length" if self.widths else True, truncation=True,
            max_length=self.max_length, return_tensors="np",
        )  # fmt: skip
        features = {name: np.concatenate([array, array]).astype(np.int64, copy=False)
                    for name, array in encoded.items()}  # fmt: skip
        mask = features["attention_mask"] != 0
        lengths = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
        parts, rows = [], []
        for selected in row_ranges(lengths.tolist(), *self.budget):
            width = max(1, int(lengths[selected].max()))
            if self.widths:
                width = next(bucket for bucket in self.widths if bucket >= width)
            parts.append({name: torch.from_numpy(np.ascontiguousarray(array[selected, :width]))
                          for name, array in features.items()})  # fmt: skip
            rows.append(selected.stop - selected.start)
        return parts, rows

    def _packed(self, sentences: list[str]) -> tuple[list[dict], list[int]]:
        ids = self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]
        doubled = ids + ids
        lengths = [len(row) for row in doubled]
        parts, rows = [], []
        for selected in row_ranges(lengths, *self.budget):
            parts.append(packed_part(doubled[selected], self.position_offset))
            rows.append(selected.stop - selected.start)
        return parts, rows


def packed_part(rows: list[list[int]], position_offset: int = 0) -> dict:
    """The packed layout of token-id ``rows``: ids and positions ``(1, T)``, offsets
    ``(len(rows) + 1,)`` int32, the longest row's length."""
    lengths = [len(row) for row in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=offsets[1:])
    ids = torch.tensor([token for row in rows for token in row], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(length) for length in lengths])[None] + position_offset
    longest = max(lengths)
    return {"input_ids": ids, "position_ids": positions, PACKED_OFFSETS: offsets, "cu_seq_lens_k": offsets,
            "max_length_q": longest, "max_length_k": longest}  # fmt: skip


def _pinned(value):
    return value.pin_memory() if isinstance(value, Tensor) else value


class Prefetcher:
    """Iterates ``make(item)`` for each item of ``items``, computed by a background thread up to
    ``depth`` items ahead. An exception in the thread is raised by the iteration that meets it;
    :meth:`close` (or leaving the ``with`` block) stops the thread. Python threads share one
    interpreter lock, but a fast tokenizer releases it while it tokenizes, and the device's work
    is queued without it."""

    _END = object()

    def __init__(self, items: Iterable, make: Callable, depth: int = 4):
        self._items, self._make = iter(items), make
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simcse-fast-prefetch", daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, self._make(item))):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        value = self._queue.get()
        if value is self._END:
            self._queue.put(value)  # later calls stop too
            raise StopIteration
        if isinstance(value, BaseException):
            self._queue.put(value)
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
