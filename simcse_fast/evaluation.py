"""Evaluation of sentence embeddings: STS (Spearman of cosine similarity) and reranking (MAP).

Formats read by ``read_sts_pairs``:

* STS Benchmark: tab-separated ``genre, file, year, id, score (0-5), sentence1, sentence2``;
  extra trailing columns are ignored.
* SICK: tab-separated ``pair_ID, sentence_A, sentence_B, relatedness_score (1-5),
  entailment_judgment``.

Either may start with a header line (a first line whose score column is not a number); errors
name the file and the line.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EvaluationDataError(ValueError):
    """An evaluation file that is missing, empty or not in a known format."""


@dataclass
class StsPairs:
    """Sentence pairs with gold similarity scores."""

    first: list[str]
    second: list[str]
    scores: np.ndarray


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_sts_pairs(path: str | Path) -> StsPairs:
    """Read an STS Benchmark or SICK file (``.gz`` too); raises ``EvaluationDataError`` with
    the reason when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationDataError(f"{path}: no such file")
    first, second, scores = [], [], []
    try:
        with _open_text(path) as handle:
            for line_number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row or (line_number == 1 and row[0].strip().lower() == "pair_id"):
                    continue
                if len(row) >= 7:
                    score, sentence_a, sentence_b = row[4], row[5], row[6]
                elif len(row) >= 4:
                    sentence_a, sentence_b, score = row[1], row[2], row[3]
                else:
                    raise EvaluationDataError(
                        f"{path}:{line_number}: expected STS Benchmark (7 tab-separated columns) or SICK "
                        f"(5 columns), got {len(row)} column(s)"
                    )
                try:
                    scores.append(float(score))
                except ValueError:
                    if line_number == 1:  # a header line (column names): not a pair
                        continue
                    raise EvaluationDataError(
                        f"{path}:{line_number}: score {score!r} is not a number"
                    ) from None
                first.append(sentence_a)
                second.append(sentence_b)
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationDataError(f"{path}: cannot read ({error})") from error
    if not scores:
        raise EvaluationDataError(f"{path}: no sentence pairs")
    return StsPairs(first, second, np.asarray(scores, dtype=np.float64))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (``scipy.stats.rankdata``'s default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks."""
    rank_a, rank_b = average_ranks(a), average_ranks(b)
    rank_a -= rank_a.mean()
    rank_b -= rank_b.mean()
    denominator = np.sqrt((rank_a**2).sum() * (rank_b**2).sum())
    return float((rank_a * rank_b).sum() / denominator) if denominator else float("nan")


def _unit_rows(embeddings) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def evaluate_sts(
    model, pairs: StsPairs | str | Path, batch_size: int = 64, show_progress_bar: bool = False
) -> float:
    """Spearman x 100 between the cosine similarity of each pair's embeddings and the gold
    score. ``model`` has an ``encode(sentences, batch_size=..., show_progress_bar=...)``
    method returning ``(n, H)`` arrays (``SimCSE``, a sentence-transformers model)."""
    if not isinstance(pairs, StsPairs):
        pairs = read_sts_pairs(pairs)
    first = _unit_rows(model.encode(pairs.first, batch_size=batch_size, show_progress_bar=show_progress_bar))
    second = _unit_rows(
        model.encode(pairs.second, batch_size=batch_size, show_progress_bar=show_progress_bar)
    )
    return 100 * spearman((first * second).sum(axis=1), pairs.scores)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean of the precision at the rank of each relevant item, candidates ranked by
    descending score (ties broken by input order)."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    hits = np.asarray(relevant, dtype=bool)[order]
    if not hits.any():
        return 0.0
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hits.mean())


def evaluate_reranking(model, samples: list[dict], batch_size: int = 64) -> float:
    """Mean average precision x 100 of reranking (AskUbuntu, SciDocs style): each sample is
    ``{"query": str, "positive": [str, ...], "negative": [str, ...]}``; the candidates
    (positives and negatives) are ranked by cosine similarity to the query."""
    scores = []
    for number, sample in enumerate(samples):
        positives, negatives = list(sample.get("positive", [])), list(sample.get("negative", []))
        if "query" not in sample or not positives:
            raise ValueError(f"samples[{number}] needs a 'query' and at least one 'positive'")
        query = _unit_rows(model.encode([sample["query"]], batch_size=batch_size))[0]
        candidates = _unit_rows(model.encode(positives + negatives, batch_size=batch_size))
        relevant = np.array([True] * len(positives) + [False] * len(negatives))
        scores.append(average_precision(candidates @ query, relevant))
    if not scores:
        raise ValueError("samples is empty")
    return 100 * float(np.mean(scores))
