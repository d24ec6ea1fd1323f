"""``SimCSE``: a Hugging Face encoder, its tokenizer and the fused pooling, in one module.

    model = sf.SimCSE("path/to/model-or-sentence-transformers-folder", pooling="mean")
    embeddings = model.encode(["a sentence", "another one"], normalize=True)   # (2, H) numpy
    model.save("out/")   # a folder plain sentence-transformers loads, and SimCSE reloads

Shapes: ``forward`` maps tokenized ``input_ids``/``attention_mask`` ``(B, L)`` to sentence
embeddings ``(B, H)``: the encoder's last hidden state ``(B, L, H)`` pooled by
``masked_mean_pool`` / ``masked_max_pool`` (or the first token for ``"cls"``). A packed batch
(``input_ids`` ``(1, T)`` with ``cu_seq_lens_q`` offsets ``(B + 1,)``, for an encoder loaded
with a varlen attention: ``simcse_fast.batching``) is pooled by ``packed_mean_pool`` /
``packed_max_pool`` (or each sequence's first token). The optional MLP
head of the official SimCSE (``Linear(H, H)`` then ``tanh``) is applied in training only
(``forward(..., use_mlp_head=True)``); ``encode`` never uses it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import functional
from .batching import PACKED_OFFSETS
from .config import POOLING_MODES

_ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "cls": "pooling_mode_cls_token",
}


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "simcse_fast.SimCSE needs Hugging Face transformers: pip install transformers"
        ) from error
    return transformers


def _read_sentence_transformers_folder(folder: Path) -> dict:
    """Where the encoder lives and how it pools, from a sentence-transformers folder's
    ``modules.json``, ``sentence_bert_config.json`` and Pooling ``config.json``."""
    modules = json.loads((folder / "modules.json").read_text())
    found = {"encoder_path": folder, "pooling": None, "normalize": False, "max_seq_length": None}
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        path = folder / module.get("path", "")
        if kind == "Transformer":
            found["encoder_path"] = path
            config_file = path / "sentence_bert_config.json"
            if config_file.exists():
                found["max_seq_length"] = json.loads(config_file.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            config = json.loads((path / "config.json").read_text())
            mode = config.get("pooling_mode")
            if mode is None:
                mode = next((name for name, key in _ST_POOLING_KEYS.items() if config.get(key)), None)
            found["pooling"] = mode if isinstance(mode, str) else None
        elif kind == "Normalize":
            found["normalize"] = True
    return found


def looks_like_local_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (absolute, relative with ``./``,
    ``~``, more than one ``/``, or ``owner`` an existing folder) is a local path."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _check_hub_model_reachable(name: str, transformers) -> None:
    """Offline (``HF_HUB_OFFLINE=1``), a hub model that is not in the local cache fails at once
    with one line, instead of the loader's retries and multi-line message."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return
    try:
        transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise FileNotFoundError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, and the hub is "
            "offline (HF_HUB_OFFLINE=1)"
        ) from None


def _sequence_limit(tokenizer, encoder) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # unset limits are a huge sentinel
        return limit
    positions = getattr(encoder.config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else 512


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" / "Writing model shards" bars from transformers between ours."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        yield
        return
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


class SimCSE(nn.Module):
    """Encoder + tokenizer + fused pooling (+ the training-only MLP head of SimCSE).

    ``model_name_or_path``: a Hugging Face model folder or hub name, or a sentence-transformers
    folder (its Transformer path, pooling mode, ``max_seq_length`` and Normalize module are
    honoured unless overridden here). ``pooling``: ``"mean"``, ``"max"`` or ``"cls"``.
    ``max_seq_length``: tokens kept per sentence (default: the folder's, else 32).
    ``mlp_head``: add SimCSE's ``Linear + tanh`` head for training. ``backend``: the backend of
    the pooling ops (None: the process default). ``device``: where to put the model.
    ``attn_implementation``: the encoder's attention (Hugging Face's name: ``"sdpa"``,
    ``"flash_attention_2"``, ...; default: transformers' choice).
    """

    def __init__(
        self,
        model_name_or_path: str,
        pooling: str | None = None,
        max_seq_length: int | None = None,
        *,
        mlp_head: bool = False,
        backend: str | None = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        transformers = _import_transformers()
        source = Path(model_name_or_path).expanduser()
        if looks_like_local_path(str(model_name_or_path)) and not source.is_dir():
            raise FileNotFoundError(f"no such model folder: {model_name_or_path}")
        settings = {
            "encoder_path": model_name_or_path,
            "pooling": None,
            "normalize": False,
            "max_seq_length": None,
        }
        if (source / "modules.json").exists():
            settings = _read_sentence_transformers_folder(source)
        pooling = pooling or settings["pooling"] or "mean"
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}; got {pooling!r}")
        max_seq_length = max_seq_length or settings["max_seq_length"] or 32
        if not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ValueError(f"max_seq_length must be a positive int; got {max_seq_length!r}")
        location = str(settings["encoder_path"])
        if not Path(location).is_dir():
            _check_hub_model_reachable(location, transformers)
        attention = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        self.encoder = transformers.AutoModel.from_pretrained(location, **attention)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(location)
        self.pooling = pooling
        self.max_seq_length = max_seq_length
        # What the loaded model supports: a sentence-transformers folder's saved length, else the
        # tokenizer's or the position embeddings' limit (training saves it unless told otherwise).
        self.base_max_seq_length = settings["max_seq_length"] or _sequence_limit(self.tokenizer, self.encoder)
        self.normalize_embeddings = settings["normalize"]
        self.backend = backend
        hidden = self.encoder.config.hidden_size
        self.mlp_head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if mlp_head else None
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def embedding_dimension(self) -> int:
        return self.encoder.config.hidden_size

    def tokenize(self, sentences: list[str]) -> dict[str, Tensor]:
        """Token ids and attention mask ``(B, L)``, padded to the longest, truncated at
        ``max_seq_length``, on the model's device."""
        batch = self.tokenizer(
            list(sentences),
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        )
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def forward(self, features: dict[str, Tensor], *, use_mlp_head: bool = False, encoder=None) -> Tensor:
        """Sentence embeddings ``(B, H)`` from tokenized ``features``, padded or packed (with
        ``cu_seq_lens_q``). ``encoder``: a callable that runs in place of ``self.encoder`` (the
        same module compiled, or timed), taking the same arguments."""
        token_embeddings = (encoder or self.encoder)(**features).last_hidden_state
        if PACKED_OFFSETS in features:
            return self._pool_packed(token_embeddings[0], features[PACKED_OFFSETS], use_mlp_head)
        mask = features["attention_mask"]
        if self.pooling == "mean":
            pooled = functional.masked_mean_pool(token_embeddings, mask, backend=self.backend)
        elif self.pooling == "max":
            pooled = functional.masked_max_pool(token_embeddings, mask, backend=self.backend)
        else:
            pooled = token_embeddings[:, 0]
        return self._head(pooled, use_mlp_head)

    def _pool_packed(self, tokens: Tensor, cu_seqlens: Tensor, use_mlp_head: bool) -> Tensor:
        """Sentence embeddings ``(B, H)`` of the packed ``tokens`` ``(T, H)``."""
        if self.pooling == "mean":
            pooled = functional.packed_mean_pool(tokens, cu_seqlens, backend=self.backend)
        elif self.pooling == "max":
            pooled = functional.packed_max_pool(tokens, cu_seqlens, backend=self.backend)
        else:
            pooled = tokens[cu_seqlens[:-1].long()]
        return self._head(pooled, use_mlp_head)

    def _head(self, pooled: Tensor, use_mlp_head: bool) -> Tensor:
        if use_mlp_head and self.mlp_head is not None:
            pooled = self.mlp_head(pooled)
        return pooled

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | list[str],
        batch_size: int = 64,
        normalize: bool | None = None,
        show_progress_bar: bool | None = None,
        convert_to: str = "numpy",
    ):
        """Embed ``sentences`` (a string gives one row): ``(len(sentences), H)`` as a float32
        numpy array (``convert_to="numpy"``) or a tensor on the model's device (``"torch"``).

        Sentences are sorted by length so that each batch pads little, and the output is put
        back in input order. ``normalize``: unit-length rows (default: what the loaded folder
        does, i.e. True after a sentence-transformers Normalize module). ``show_progress_bar``
        defaults to on for more than ten batches.
        """
        from tqdm.auto import tqdm

        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch'; got {convert_to!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        if not all(isinstance(sentence, str) for sentence in sentences):
            raise TypeError("sentences must be a string or a list of strings")
        normalize = self.normalize_embeddings if normalize is None else normalize
        order = sorted(range(len(sentences)), key=lambda index: -len(sentences[index]))
        if show_progress_bar is None:
            show_progress_bar = len(sentences) > 10 * batch_size
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in tqdm(
                range(0, len(order), batch_size), desc="Encoding", disable=not show_progress_bar
            ):
                batch = [sentences[index] for index in order[start : start + batch_size]]
                chunks.append(self(self.tokenize(batch)).float())
        finally:
            self.train(was_training)
        if chunks:
            embeddings = torch.cat(chunks)[torch.argsort(torch.tensor(order, device=self.device))]
        else:
            embeddings = torch.empty((0, self.embedding_dimension), device=self.device)
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        if single:
            embeddings = embeddings[0]
        return embeddings.cpu().numpy().astype(np.float32) if convert_to == "numpy" else embeddings

    def save(self, folder: str | Path) -> Path:
        """Write a sentence-transformers folder (encoder and tokenizer at the top,
        ``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``,
        ``1_Pooling/config.json``, a Normalize module if the model normalizes, and a short
        ``README.md`` unless one is there): plain sentence-transformers and ``SimCSE`` both load
        it. The training-only MLP head is not saved."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize_embeddings:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
            (folder / "2_Normalize").mkdir(exist_ok=True)
        (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        bert_config = {"max_seq_length": self.max_seq_length, "do_lower_case": False}
        (folder / "sentence_bert_config.json").write_text(json.dumps(bert_config, indent=2) + "\n")
        pooling_config = {
            "word_embedding_dimension": self.embedding_dimension,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        pooling_config.update({key: self.pooling == mode for mode, key in _ST_POOLING_KEYS.items()})
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2) + "\n")
        # The files sentence-transformers looks for besides: where one is missing, releases before
        # 5 ask the hub for it when the folder's path could be a hub name ("simcse-model").
        model_config = {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}
        (folder / "config_sentence_transformers.json").write_text(json.dumps(model_config, indent=2) + "\n")
        card = folder / "README.md"
        if not card.exists():
            card.write_text(
                "# Sentence embeddings\n\nA sentence-transformers model saved by simcse_fast "
                f"({self.pooling} pooling, max_seq_length {self.max_seq_length}). Load it with "
                "`sentence_transformers.SentenceTransformer(path)` or `simcse_fast.SimCSE(path)`.\n"
            )
        return folder
