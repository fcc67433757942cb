"""Shared fixtures: the default model's tokenizer and tiny random-weight models built from configs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def default_model_dir():
    """The bundled default model as a safetensors folder (converted once, then cached)."""
    from rain_llm.engine.hf.models import converted_folder, default_gguf

    return converted_folder(default_gguf())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def tiny_model(arch: str, vocab: int):
    """A seeded 2-3 layer random model of the given architecture."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, **common))
    elif arch == "gemma3":  # sliding-window layers with a window shorter than the contexts used
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, head_dim=16, sliding_window=4,
                                                   layer_types=["sliding_attention", "sliding_attention",
                                                                "full_attention"], **common))
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "gemma3", "qwen2"])
def tiny(request, tokenizer):
    return request.param, tiny_model(request.param, len(tokenizer))


@pytest.fixture(scope="session")
def embedder():
    """The sentence embedder, loaded once."""
    from rain_llm.values.embedder import MiniLMEmbedder

    return MiniLMEmbedder.load()


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """The bundled default model and its tokenizer, loaded once for the whole session."""
    from rain_llm.engine.hf.models import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def default_rain(default_model, embedder):
    """A `Rain` on the default model: the weights are the session's, the caches this module's own."""
    from rain_llm import Rain

    model, tok = default_model
    return Rain(model, tok, embedder=embedder, name="default")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return tiny_model("llama", len(tokenizer))


@pytest.fixture(scope="module")
def tiny_rain(tiny_llama, tokenizer, embedder):
    """A `Rain` on a tiny random Llama with the real tokenizer (weights shared, caches per module)."""
    from rain_llm import Rain

    return Rain(tiny_llama, tokenizer, embedder=embedder, name="tiny")
