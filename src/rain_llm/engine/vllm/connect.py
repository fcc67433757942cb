"""Opening vLLM servers: what they serve and allow, checked before any answer (`open_servers`).

The servers are asked first, before anything heavy loads, so a wrong URL fails in a second: their
model and context length (`/v1/models`), version (`/version`: whether the scoring isolation is
needed), the most log-probabilities they return (probed: `--max-logprobs`), whether they report
cached tokens (`--enable-prompt-tokens-details`). Then the tokenizer loads (`tokenizer`, else the
folder the server loaded) and must tokenize a probe text as the server does (ids cross the wire).
The caller (`Rain.connect`) builds the `Rain` from what this returns.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rain_llm.engine.vllm.backend import VLLMBackend
from rain_llm.engine.vllm.client import DEFAULT_KEY_ENV, Client, NotFound, Server
from rain_llm.engine.vllm.wire import Wire
from rain_llm.errors import EngineError, EngineRefused, RainError
from rain_llm.runtime.text import Codec

PROBE = "Hello, world! RAIN: 12 tokens?"  # text whose ids must match the server's tokenizer
LOGPROBS_CAP = 4096  # the most log-probabilities the probe looks for
# No released vLLM keeps a `logprob_token_ids` request's logprobs from its batch-mates (PR #51789,
# open): the isolation is on for every version until one is known fixed (then: versions from it on).
SCORING_FIXED_IN: tuple[int, ...] | None = None


@dataclass
class Remote:
    """What `Rain.connect` builds a `Rain` from."""

    backend: VLLMBackend
    tokenizer: Any
    codec: Codec
    name: str


def open_servers(urls: str | Sequence[str], tokenizer: str | None = None, *, key_env: str = DEFAULT_KEY_ENV,
                 name: str | None = None, timeout: float | None = None, isolate_scoring: bool | None = None,
                 salt: str | None = None, log: Any = None) -> Remote:
    """The vLLM servers at `urls` (one model), checked (module docstring). `isolate_scoring`: None
    decides from the server's version, True/False forces it; `salt`: a cache salt for every request."""
    client = Client(key_env, timeout)
    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed:
        raise RainError("no vLLM server: give --engine-url URL (e.g. http://127.0.0.1:8000)")
    servers = [client.server(url) for url in listed]
    entries = [_served(client, server, name) for server in servers]
    model, root = str(entries[0]["id"]), str(entries[0].get("root") or "")
    other = [f"{s.url} serves {e['id']!r}" for s, e in zip(servers, entries) if e["id"] != model]
    if other:
        raise RainError(f"the servers serve different models ({servers[0].url} serves {model!r}, "
                        f"{'; '.join(other)}): give servers of one model")
    version = _version(client, servers[0])
    isolate = isolate_scoring if isolate_scoring is not None else _needs_isolation(version)
    max_logprobs = min(_max_logprobs(client, server, model) for server in servers)
    if not _reports_cached_tokens(client, servers[0], model):
        print(f"rain: warning: the vLLM server at {servers[0].url} does not report cached prompt tokens (start it "
              "with --enable-prompt-tokens-details): tokens processed will count whole prompts", file=log or sys.stderr)

    from transformers import AutoTokenizer  # only now: a wrong URL fails before this import

    from rain_llm.engine.hf.models import resolve

    if tokenizer is not None:
        folder = resolve(tokenizer)[0]
    elif root and Path(root).is_dir():
        folder = root
    else:
        raise RainError(f"the vLLM server at {servers[0].url} loaded {root or model!r}, not a folder here: "
                        "give --model FOLDER for the tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise RainError(f"cannot load a tokenizer from {folder}: {' '.join(str(err).split())[:200]}") from err
    _check_tokenizer(client, servers[0], model, tok, folder, root)
    stop = _model_stop_ids(tok, folder) if Path(folder).is_dir() else \
        ([int(tok.eos_token_id)] if tok.eos_token_id is not None else [])
    codec = Codec(tok, stop)
    backend = VLLMBackend(servers, client, Wire(model, codec), context_window=min(int(e["max_model_len"])
                                                                                  for e in entries),
                          max_logprobs=max_logprobs, isolate_scoring=isolate, salt=salt)
    return Remote(backend, tok, codec, model)


def _served(client: Client, server: Server, name: str | None) -> dict[str, Any]:
    """The /v1/models entry of the model the server serves (`name`, or its first)."""
    reply = client.get(server, "/models")
    entries = reply.get("data") if isinstance(reply, dict) else None
    if not entries:
        raise RainError(f"{server.url}/v1/models lists no model: is it a vLLM server?")
    ids = [str(e.get("id")) for e in entries]
    entry = entries[0] if name is None else next((e for e in entries if e.get("id") == name), None)
    if entry is None:
        raise RainError(f"the vLLM server at {server.url} serves {', '.join(map(repr, ids))}, not {name!r}: "
                        f"fix the name, or start it with --served-model-name {name}")
    if not isinstance(entry.get("max_model_len"), int):
        raise RainError(f"{server.url}/v1/models gives no max_model_len: is it a vLLM server?")
    return dict(entry)


def _version(client: Client, server: Server) -> tuple[int, ...] | None:
    try:
        reply = client.get(server, "//version")
        return tuple(int(p) for p in str(reply.get("version", "")).split("+")[0].split(".")[:3])
    except (EngineError, ValueError, AttributeError):
        return None


def _needs_isolation(version: tuple[int, ...] | None) -> bool:
    return SCORING_FIXED_IN is None or version is None or version < SCORING_FIXED_IN


def _max_logprobs(client: Client, server: Server, model: str) -> int:
    """The most log-probabilities per token the server returns (its --max-logprobs), found by
    asking: doubling while it accepts, then halving the gap (a one-token prompt each)."""
    def accepts(k: int) -> bool:
        try:
            client.post(server, "/completions", {"model": model, "prompt": [0], "max_tokens": 1, "temperature": 0.0,
                                                 "logprobs": k})
            return True
        except EngineRefused:
            return False

    if not accepts(1):
        return 0
    low, high = 1, 2
    while high <= LOGPROBS_CAP and accepts(high):
        low, high = high, high * 2
    if high > LOGPROBS_CAP:
        return LOGPROBS_CAP
    while high - low > 1:  # low accepted, high refused
        mid = (low + high) // 2
        low, high = (mid, high) if accepts(mid) else (low, mid)
    return low


def _reports_cached_tokens(client: Client, server: Server, model: str) -> bool:
    reply = client.post(server, "/completions", {"model": model, "prompt": [0], "max_tokens": 1, "temperature": 0.0})
    return isinstance((reply.get("usage") or {}).get("prompt_tokens_details"), dict)


def _model_stop_ids(tokenizer: Any, folder: str) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and the folder's generation_config.json eos_token_id."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    config = Path(folder) / "generation_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except ValueError as err:
            raise RainError(f"{config} is not valid JSON: {err}") from err
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return sorted(int(i) for i in ids)


def _check_tokenizer(client: Client, server: Server, model: str, tokenizer: Any, folder: str, root: str) -> None:
    """The server must tokenize a probe text as the local tokenizer does (ids cross the wire)."""
    try:
        reply = client.post(server, "//tokenize", {"model": model, "prompt": PROBE, "add_special_tokens": False})
    except NotFound:
        return  # a server without /tokenize: nothing to compare
    ours = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if list(reply.get("tokens", [])) != ours:
        raise RainError(f"the tokenizer from {folder} does not match the model the vLLM server at {server.url} "
                        f"runs ({root or model}): give --model with that model's folder")
