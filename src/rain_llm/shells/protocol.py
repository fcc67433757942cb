"""The OpenAI chat-completions protocol as `rain serve` speaks it: typed request models, the
server's limits, and the response shapes.

A request body is checked field by field before it goes near the model: JSON types are strict
(no "1.5" for a number), numbers finite, RAIN settings typed from `RainConfig` itself and then
range-checked by it, and every setting held to the server's caps. Every problem is a
`RequestError` with one line naming the field.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic import create_model as _create_model

from rain_llm.config import RainConfig
from rain_llm.errors import RainError
from rain_llm.runtime.prompts import Prompt, as_messages
from rain_llm.values.templates import BUILTIN_TEMPLATES

# Settings that name files or models on the server's disk, or change how it computes: fixed by
# whoever starts the server, not by a request.
SERVER_ONLY_KEYS = frozenset({"value", "fewshot", "prompt_format", "eval_format", "reuse_cache"})
# OpenAI parameters RAIN has no meaning for: refused (400) rather than silently ignored.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logit_bias": None,
               "logprobs": False, "top_logprobs": None, "stop": None, "presence_penalty": 0, "frequency_penalty": 0,
               "response_format": None}
MAX_SEED = 2 ** 63 - 1


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the field it is about."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Limits:
    """What one request (and the server) may ask for; set by `rain serve` flags."""

    max_tokens: int = 1024  # answer length
    max_t_max: int = 200  # iterations per committed step (t_max, fresh_iterations)
    max_parallel_leaves: int = 8
    max_candidates: int = 32  # num_candidates, sample_attempts, dynamic additions
    max_rollout_tokens: int = 256
    max_token_set_length: int = 64
    max_search_seconds: float = 600.0  # per answer; a request may ask for less, never more (0: no cap)
    max_search_tokens: int = 0  # per answer in LM tokens (0: no cap)
    request_timeout: float = 900.0  # a deadline per request, from its arrival: then the best committed answer
    max_queue: int = 64  # requests waiting beyond the batch; more get 429
    max_body_bytes: int = 1 << 20
    max_prompt_bytes: int = 256 << 10  # checked before tokenising
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    FLAGS = {"max_tokens": "--limit-max-tokens", "max_t_max": "--limit-t-max",
             "max_parallel_leaves": "--limit-parallel-leaves", "max_candidates": "--limit-candidates",
             "max_rollout_tokens": "--limit-rollout-tokens", "max_token_set_length": "--limit-token-set-length",
             "max_search_seconds": "--max-search-seconds", "max_search_tokens": "--max-search-tokens",
             "request_timeout": "--request-timeout", "max_queue": "--max-queue", "max_body_bytes": "--max-body-bytes",
             "max_prompt_bytes": "--max-prompt-bytes", "header_timeout": "--header-timeout",
             "body_timeout": "--body-timeout"}  # the `rain serve` flag of each

    def check(self) -> Limits:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0 or (value == 0 and f.name in (
                    "max_tokens", "max_t_max", "max_parallel_leaves", "max_candidates", "max_rollout_tokens",
                    "max_token_set_length", "max_body_bytes", "max_prompt_bytes", "header_timeout", "body_timeout",
                    "request_timeout")):
                raise RainError(f"invalid {self.FLAGS[f.name]} {value}")
        return self


# ---------------------------------------------------------------------------------------------- request models
def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Real = Annotated[StrictInt | StrictFloat, AfterValidator(_finite)]
Seed = Annotated[StrictInt, AfterValidator(lambda v: _in_range(v, 0, MAX_SEED))]


def _in_range(value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"must be an integer in [{low}, {high}]")
    return value


def _setting_type(default: Any) -> Any:
    """The strict JSON type of a RainConfig setting, from its default."""
    if isinstance(default, bool):
        return StrictBool
    if isinstance(default, int):
        return StrictInt
    if isinstance(default, float):
        return Real
    if isinstance(default, tuple):
        return list[StrictInt]
    return StrictStr


# Every RainConfig key a request may set, typed from its default (ranges: RainConfig.validate).
RainSettings = _create_model(
    "RainSettings", __config__=ConfigDict(extra="forbid"),
    **{f.name: (_setting_type(getattr(RainConfig, f.name, ())) | None, None)
       for f in fields(RainConfig) if f.name not in SERVER_ONLY_KEYS and f.name != "seed"},
    seed=(Seed | None, None))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # "name" and the like: accepted, not used
    role: StrictStr
    content: StrictStr | list[TextPart]


class ChatRequest(BaseModel):
    """A /v1/chat/completions body. Unknown OpenAI fields are accepted and ignored (clients send
    "user", "stream_options", ...); those RAIN has no meaning for are refused by name."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    seed: Seed | None = None
    temperature: Real | None = None
    top_p: Real | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    rain: RainSettings | None = None  # type: ignore[valid-type]


@dataclass
class ChatJob:
    """A checked request: what to answer, with which settings, and how to reply."""

    prompt: Prompt
    cfg: RainConfig
    stream: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.monotonic)


def parse_chat(body: Any, base: RainConfig, model_name: str, limits: Limits) -> ChatJob:
    """A chat completions request -> a checked job. Raises RequestError naming the problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "malformed request: the body must be a JSON object")
    if "model" not in body:
        raise RequestError(400, "missing 'model'", param="model")
    if isinstance(body["model"], str) and body["model"] != model_name:
        raise RequestError(404, f"model {body['model']!r} not found: this server serves {model_name!r}",
                           "not_found_error", "model")
    rain = body.get("rain")
    if isinstance(rain, dict):
        for key in rain:
            if key in SERVER_ONLY_KEYS:
                flag = "--" + key.replace("_", "-")
                raise RequestError(400, f"RAIN setting {key!r} is fixed by the server (rain serve {flag})",
                                   param=f"rain.{key}")
            if key not in RainSettings.model_fields:
                raise RequestError(400, f"unknown RAIN setting {key!r}", param=f"rain.{key}")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as err:
        raise _field_error(err) from None
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None):
            raise RequestError(400, f"'{key}' is not supported by RAIN", param=key)
    if request.n not in (None, 1):
        raise RequestError(400, "'n' must be 1: one answer per request", param="n")
    if request.top_p not in (None, 1):
        raise RequestError(400, "'top_p' is not supported: RAIN samples candidates by top-k (rain.top_k)",
                           param="top_p")
    prompt = _conversation(request.messages, limits)
    changes = {k: v for k, v in (request.rain.model_dump(exclude_none=True) if request.rain else {}).items()}
    if changes.get("template") is not None and changes["template"] not in BUILTIN_TEMPLATES:
        raise RequestError(400, f"template {changes['template']!r}: a request may name a built-in template only "
                           f"({', '.join(BUILTIN_TEMPLATES)})", param="rain.template")
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if limit is not None:
        changes["max_new_tokens"] = limit
    for key in ("seed", "temperature"):
        if getattr(request, key) is not None:
            changes[key] = getattr(request, key)
    if changes.get("temperature") == 0 and changes.get("method", base.method) == "rain":
        raise RequestError(400, "temperature=0: RAIN samples candidate token sets, give a positive temperature "
                           "(or rain.method = vanilla for greedy decoding)", param="temperature")
    try:
        cfg = base.replace(**changes)
    except RainError as err:
        raise RequestError(400, str(err)) from None
    return ChatJob(prompt, held_to(cfg, base, limits), request.stream)


def held_to(cfg: RainConfig, base: RainConfig, limits: Limits) -> RainConfig:
    """`cfg` if it is within the server's caps (the compute budget: the server's setting, or a
    smaller one); RequestError naming the cap otherwise."""
    def over(name: str, value: Any, cap: Any, flag: str) -> None:
        raise RequestError(400, f"{name}={value} is over this server's cap of {cap} (rain serve {flag})",
                           param=name if name in ("max_tokens",) else f"rain.{name}")

    flags = Limits.FLAGS
    caps = [("max_new_tokens", limits.max_tokens, flags["max_tokens"]), ("t_max", limits.max_t_max, flags["max_t_max"]),
            ("fresh_iterations", limits.max_t_max, flags["max_t_max"]),
            ("parallel_leaves", limits.max_parallel_leaves, flags["max_parallel_leaves"]),
            ("num_candidates", limits.max_candidates, flags["max_candidates"]),
            ("sample_attempts", limits.max_candidates, flags["max_candidates"]),
            ("dynamic_extra_samples", limits.max_candidates, flags["max_candidates"]),
            ("dynamic_max_children", 2 * limits.max_candidates, flags["max_candidates"] + ", twice"),
            ("max_rollout_tokens", limits.max_rollout_tokens, flags["max_rollout_tokens"])]
    for name, cap, flag in caps:
        if getattr(cfg, name) > cap:
            over("max_tokens" if name == "max_new_tokens" else name, getattr(cfg, name), cap, flag)
    if max(cfg.token_set_lengths) > limits.max_token_set_length or len(cfg.token_set_lengths) > 16:
        over("token_set_lengths", list(cfg.token_set_lengths), f"{limits.max_token_set_length} tokens (16 depths)",
             flags["max_token_set_length"])
    budgets = (("max_search_seconds", limits.max_search_seconds), ("max_search_tokens", limits.max_search_tokens))
    for name, cap in budgets:
        value = getattr(cfg, name)
        if cap and (value == 0 or value > cap):
            over(name, value if value else "0 (none)", cap, flags[name])
    return cfg


def _field_error(err: ValidationError) -> RequestError:
    """The first problem pydantic found, as one line naming the field."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-", "int", "float")))
    message = first["msg"].replace("Input should be a valid", "must be a").replace("Value error, ", "")
    if first["type"] == "missing":
        return RequestError(400, f"missing '{where}'", param=where)
    if first["type"] == "extra_forbidden":
        return RequestError(400, f"unknown field '{where}'", param=where)
    return RequestError(400, f"invalid '{where}': {message}", param=where)


def _conversation(messages: list[Message], limits: Limits) -> Prompt:
    """The request's messages as RAIN's prompt: the text of a lone user message, else the
    conversation; its size checked in bytes before anything tokenises it."""
    if not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for message in messages:
        content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
        out.append({"role": message.role, "content": content})
    size = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in out)
    if size > limits.max_prompt_bytes:
        raise RequestError(400, f"prompt too long: {size} bytes, over this server's {limits.max_prompt_bytes} "
                           f"(rain serve {Limits.FLAGS['max_prompt_bytes']})", param="messages")
    for i, m in enumerate(out):
        if any(0xD800 <= ord(c) <= 0xDFFF for c in m["content"]):
            raise RequestError(400, f"message {i}: content holds an unpaired UTF-16 surrogate (not valid text)",
                               param="messages")
    try:
        as_messages(out)
    except RainError as err:
        raise RequestError(400, str(err), param="messages") from None
    return out[0]["content"] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------- responses
def finish_reason(token_ids: list[int], stop_ids: frozenset[int], max_new_tokens: int) -> str:
    if token_ids and token_ids[-1] in stop_ids:
        return "stop"
    return "length" if len(token_ids) >= max_new_tokens else "stop"  # else: a transcript's turn ended


def chat_response(job: ChatJob, out: Any, model_name: str, stop_ids: frozenset[int]) -> dict[str, Any]:
    """An OpenAI chat.completion object for a finished job; RAIN's figures under the extra key 'rain'."""
    prompt_tokens = out.stats.prompt_tokens
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "finish_reason": finish_reason(out.token_ids, stop_ids, job.cfg.max_new_tokens),
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(out.token_ids),
                  "total_tokens": prompt_tokens + len(out.token_ids)},
        "rain": {"method": out.method, "stats": out.stats.to_dict()},
    }


def chunk(job: ChatJob, model_name: str, delta: dict[str, str], finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk event of a streamed answer."""
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
