"""Public API surface: backend selection and clear errors for bad input."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inputs import cpu_backends

import simcse_fast as sf
from simcse_fast import _backends

POOLS = [sf.masked_mean_pool, sf.masked_max_pool]


def test_public_names():
    for name in ("masked_mean_pool", "masked_max_pool", "reference", "available_backends", "InfoNCELoss"):
        assert hasattr(sf, name)
    for name in ("masked_mean_pool", "masked_max_pool", "similarity_logsumexp", "info_nce"):
        assert callable(getattr(sf.reference, name))


def test_available_backends_lists_what_runs_here():
    names = sf.available_backends()
    assert names[0] == "torch"
    assert set(names) <= {"torch", "triton", "cuda"}
    assert ("triton" in names) == (torch.cuda.is_available() or "triton" in cpu_backends())


def test_reference_imports_nothing_from_the_package():
    tree = ast.parse(Path(sf.reference.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("simcse_fast"), ast.dump(node)
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("simcse_fast") for alias in node.names)


def test_import_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, simcse_fast as sf\n"
        "assert sf.available_backends() == ['torch'], sf.available_backends()\n"
        "x = torch.randn(2, 3, 4); m = torch.ones(2, 3)\n"
        "torch.testing.assert_close(sf.masked_mean_pool(x, m), x.mean(1))\n"
        "try:\n"
        "    sf.masked_mean_pool(x, m, backend='triton')\n"
        "except ValueError as error:\n"
        "    assert 'Triton could not be imported' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('backend=triton without Triton did not raise')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("pool", POOLS)
def test_auto_uses_torch_for_cpu_tensors(pool, monkeypatch):
    calls = []
    monkeypatch.setattr(sf.reference, pool.__name__, lambda *args: calls.append(args) or torch.zeros(2, 4))
    pool(torch.randn(2, 3, 4), torch.ones(2, 3), backend="auto")
    assert len(calls) == 1


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", "torch")
    supported = {"torch": (torch.float32,), "triton": (torch.float32,)}
    cpu = torch.device("cpu")
    assert _backends.resolve_backend(None, cpu, "masked_mean_pool", supported, torch.float32, "x") == "torch"
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        sf.masked_mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3))
    monkeypatch.setenv("SIMCSE_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SIMCSE_FAST_BACKEND='fastest'"):
        sf.masked_mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3))


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_backends, "TRITON_INTERPRETER", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        sf.masked_max_pool(torch.randn(2, 3, 4), torch.ones(2, 3), backend="triton")


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"backend": "fastest"}, ValueError, "backend must be one of"),
        ({"backend": 3}, TypeError, "backend must be a str"),
        ({"backend": "cuda"}, ValueError, "backend='cuda' cannot run here"),
    ],
)
def test_bad_backend(pool, kwargs, error, message):
    with pytest.raises(error, match=message):
        pool(torch.randn(2, 3, 4), torch.ones(2, 3), **kwargs)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize(
    "x, mask, error, message",
    [
        ([[1.0]], torch.ones(1, 1), TypeError, "token_embeddings must be a torch.Tensor"),
        (torch.randn(2, 3), torch.ones(2, 3), ValueError, "token_embeddings must have 3 dimensions"),
        (
            torch.ones(2, 3, 4, dtype=torch.int64),
            torch.ones(2, 3),
            TypeError,
            "token_embeddings must have dtype",
        ),
        (torch.randn(2, 3, 4), [[1, 1, 1]] * 2, TypeError, "attention_mask must be a torch.Tensor"),
        (torch.randn(2, 3, 4), torch.ones(2, 3, 1), ValueError, "attention_mask must have 2 dimensions"),
        (torch.randn(2, 3, 4), torch.ones(3, 2), ValueError, r"attention_mask must have shape \(B, L\)"),
        (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.complex64), TypeError, "attention_mask must be"),
        (torch.randn(2, 3, 4), torch.ones(2, 3, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_pooling_input(pool, x, mask, error, message):
    with pytest.raises(error, match=message):
        pool(x, mask)


@pytest.mark.parametrize(
    "docs, kwargs, message",
    [
        (torch.randn(0, 8), {}, "one or more whole columns of 4 documents"),
        (torch.randn(6, 8), {}, "one or more whole columns of 4 documents"),
        (torch.randn(8, 8), {"n_local": 5}, r"n_local must be an int in \[0, 4\]"),
        (torch.randn(8, 8), {"directions": ("doc_to_query",)}, "must include 'query_to_doc'"),
        (torch.randn(8, 8), {"partition_mode": "mean"}, "partition_mode must be"),
    ],
)
def test_in_batch_negatives_loss_rejects_bad_layouts(docs, kwargs, message):
    from simcse_fast.functional import in_batch_negatives_loss

    kwargs = {"n_local": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        in_batch_negatives_loss(torch.randn(4, 8), docs, **kwargs)


def test_readme_backend_table_is_the_declared_one():
    """The README's per-op-family backend table is generated from the declarations that
    resolve_backend reads (pooling.POOLING_BACKENDS, similarity.LOSS_BACKENDS)."""
    from pathlib import Path

    from simcse_fast import functional

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert functional.backend_table() in readme


def test_requested_backend_without_the_dtype_explains():
    with pytest.raises(ValueError, match="backend='cuda' cannot run here: its masked_mean_pool takes"):
        sf.masked_mean_pool(torch.randn(2, 3, 4, dtype=torch.float64), torch.ones(2, 3), backend="cuda")
