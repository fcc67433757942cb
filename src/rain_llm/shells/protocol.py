"""The OpenAI protocol as `rain serve` speaks it: typed request models for /v1/chat/completions and
/v1/completions, the server's limits, stop strings, and the response shapes.

A request body is checked field by field before it goes near the model: JSON types are strict
(no "1.5" for a number), numbers finite and integers within 64 bits, RAIN settings typed from
`RainConfig` itself and then range-checked by it, and every setting held to the server's caps.
Every problem is a `RequestError` with one line naming the field (and the field in `param`).

What the evaluation clients send, and what it means here: `stop` ends the answer at the first
stop string in its text (which is cut there); `temperature: 0` asks for a reproducible answer,
which RAIN always gives for a seed (`seed`, else the server's), so it keeps its own candidate
temperature; `n: 1`, `top_p: 1` and `logprobs: false` are what RAIN does anyway. A plain prompt
(/v1/completions) is answered as one user message, as RAIN answers a request.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainValidator,
    StrictBool,
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
# OpenAI parameters RAIN has no meaning for, with the value that asks for nothing: anything else
# is refused (400) rather than silently ignored.
UNSUPPORTED = {"logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None,
               "function_call": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
               "response_format": None}
UNSUPPORTED_COMPLETION = {"logprobs": None, "echo": False, "suffix": None, "best_of": 1, "logit_bias": None,
                          "presence_penalty": 0, "frequency_penalty": 0}
WHY_UNSUPPORTED = {"logprobs": ": RAIN returns text, not log-probabilities (an evaluation's loglikelihood and "
                               "multiple-choice tasks need a model server; generative tasks work)",
                   "echo": ": RAIN returns the answer only (loglikelihood tasks need a model server)"}
MAX_SEED = 2 ** 63 - 1
MAX_INT = 2 ** 63 - 1
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; lm-eval's completions send more)
MAX_STOP_CHARS = 256


def printable(text: str) -> str:
    """`text` fit for one line of JSON or log: characters that are not printable (newlines, lone
    surrogates, which no JSON encoder can write) escaped as Python writes them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the field it is about."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, printable(message), kind, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        param = printable(self.param) if self.param is not None else None
        return {"error": {"message": self.message, "type": self.kind, "param": param, "code": None}}


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
    max_queue: int = 64  # requests waiting beyond the batch's free places; more get 429
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
def _real(value: Any) -> float | int:
    """A JSON number (not a string, not a boolean), finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise ValueError("must be a finite number")
    return value


def _in_range(value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"must be an integer in [{low}, {high}]")
    return value


Real = Annotated[float | int, PlainValidator(_real)]
Int = Annotated[StrictInt, AfterValidator(lambda v: _in_range(v, -MAX_INT - 1, MAX_INT))]
Seed = Annotated[StrictInt, AfterValidator(lambda v: _in_range(v, 0, MAX_SEED))]


def _setting_type(default: Any) -> Any:
    """The strict JSON type of a RainConfig setting, from its default."""
    if isinstance(default, bool):
        return StrictBool
    if isinstance(default, int):
        return Int
    if isinstance(default, float):
        return Real
    if isinstance(default, tuple):
        return list[Int]
    return StrictStr


# Every RainConfig key a request may set, typed from its default (ranges: RainConfig.validate).
RainSettings = _create_model(  # type: ignore[call-overload]  # fields built from RainConfig
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


class _Request(BaseModel):
    """What both endpoints take. Unknown OpenAI fields are accepted and ignored (clients send
    "user", "stream_options", ...); those RAIN has no meaning for are refused by name."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    seed: Seed | None = None
    temperature: Real | None = None
    top_p: Real | None = None
    n: Int | None = None
    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
    rain: RainSettings | None = None  # type: ignore[valid-type]


class ChatRequest(_Request):
    """A /v1/chat/completions body."""

    messages: list[Message]


class CompletionRequest(_Request):
    """A /v1/completions body: one text prompt (token ids are not taken: RAIN renders the prompt)."""

    prompt: StrictStr | list[StrictStr] | list[Int] | list[list[Int]]


AnyRequest = TypeVar("AnyRequest", bound=_Request)


@dataclass
class Job:
    """A checked request: what to answer, with which settings, and how to reply (`kind`: "chat"
    or "completion", the response shapes)."""

    prompt: Prompt
    cfg: RainConfig
    stream: bool
    kind: str = "chat"
    stops: tuple[str, ...] = ()
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def prompt_param(self) -> str:
        """The request field that holds the prompt."""
        return "messages" if self.kind == "chat" else "prompt"



def parse_chat(body: Any, base: RainConfig, model_name: str, limits: Limits) -> Job:
    """A chat completions request -> a checked job. Raises RequestError naming the problem."""
    request = _validated(ChatRequest, body, model_name, UNSUPPORTED)
    return _job(request, _conversation(request.messages, limits), "chat", base, limits)


def parse_completion(body: Any, base: RainConfig, model_name: str, limits: Limits) -> Job:
    """A completions request (a plain prompt) -> a checked job; the prompt is answered as one user
    message. Raises RequestError naming the problem."""
    request = _validated(CompletionRequest, body, model_name, UNSUPPORTED_COMPLETION)
    prompt: Any = request.prompt
    if isinstance(prompt, list):
        if prompt and not all(isinstance(p, str) for p in prompt):
            raise RequestError(400, "'prompt' as token ids is not supported: send the prompt as text (lm-eval: "
                               "tokenizer_backend=none)", param="prompt")
        if len(prompt) != 1:
            raise RequestError(400, f"'prompt' must be one text, not a list of {len(prompt)}: one answer per request "
                               "(lm-eval: batch_size=1, num_concurrent=N for parallel requests)", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt' must be a text", param="prompt")
    return _job(request, _text_prompt(prompt, limits), "completion", base, limits)


def _validated(model: type[AnyRequest], body: Any, model_name: str, unsupported: dict[str, Any]) -> AnyRequest:
    """The body as `model`, with the model name, the RAIN settings' keys and the unsupported
    parameters checked (each its own message)."""
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
        request = model.model_validate(body)
    except ValidationError as err:
        raise _field_error(err) from None
    for key, default in unsupported.items():
        if body.get(key, default) not in (default, None):
            raise RequestError(400, f"'{key}' is not supported by RAIN{WHY_UNSUPPORTED.get(key, '')}", param=key)
    if request.n not in (None, 1):
        raise RequestError(400, "'n' must be 1: one answer per request", param="n")
    if request.top_p not in (None, 1):
        raise RequestError(400, "'top_p' must be 1: RAIN samples candidates by top-k (rain.top_k)", param="top_p")
    return request


def _job(request: _Request, prompt: Prompt, kind: str, base: RainConfig, limits: Limits) -> Job:
    """The job for a validated request: its settings (RAIN's, then the OpenAI fields that map to
    them) checked by RainConfig and held to the server's caps."""
    changes: dict[str, Any] = request.rain.model_dump(exclude_none=True) if request.rain else {}
    params = {key: f"rain.{key}" for key in changes}  # where each setting came from
    if changes.get("template") is not None and changes["template"] not in BUILTIN_TEMPLATES:
        raise RequestError(400, f"template {changes['template']!r}: a request may name a built-in template only "
                           f"({', '.join(BUILTIN_TEMPLATES)})", param="rain.template")
    for key in ("max_completion_tokens", "max_tokens"):
        if getattr(request, key) is not None:
            changes["max_new_tokens"], params["max_new_tokens"] = getattr(request, key), key
            break
    if request.seed is not None:
        changes["seed"], params["seed"] = request.seed, "seed"
    if request.temperature:  # 0 asks for a reproducible answer: RAIN's is, for its seed (module docstring)
        changes["temperature"], params["temperature"] = request.temperature, "temperature"
    try:
        cfg = base.replace(**changes)
    except RainError as err:
        named = re.match(r"invalid config(?: value)?:? (\w+)", str(err))
        key = named.group(1) if named else ""
        raise RequestError(400, str(err), param=params.get(key, f"rain.{key}" if key else None)) from None
    return Job(prompt, held_to(cfg, base, limits, params), request.stream, kind, _stops(request.stop))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise RequestError(400, f"'stop' holds {len(stops)} strings, over this server's {MAX_STOPS}", param="stop")
    for text in stops:
        if not text:
            raise RequestError(400, "'stop' strings must not be empty", param="stop")
        if len(text) > MAX_STOP_CHARS:
            raise RequestError(400, f"a 'stop' string of {len(text)} characters is over this server's "
                               f"{MAX_STOP_CHARS}", param="stop")
        if _has_surrogate(text):
            raise RequestError(400, "a 'stop' string holds an unpaired UTF-16 surrogate (not valid text)",
                               param="stop")
    return tuple(dict.fromkeys(stops))


def held_to(cfg: RainConfig, base: RainConfig, limits: Limits, params: dict[str, str] | None = None) -> RainConfig:
    """`cfg` if it is within the server's caps (the compute budget: the server's setting, or a
    smaller one); RequestError naming the cap (and the field that asked, from `params`) otherwise."""
    params = params or {}

    def over(name: str, value: Any, cap: Any, flag: str) -> None:
        shown = "max_tokens" if name == "max_new_tokens" else name
        raise RequestError(400, f"{shown}={value} is over this server's cap of {cap} (rain serve {flag})",
                           param=params.get(name, "max_tokens" if name == "max_new_tokens" else f"rain.{name}"))

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
            over(name, getattr(cfg, name), cap, flag)
    if max(cfg.token_set_lengths) > limits.max_token_set_length or len(cfg.token_set_lengths) > 16:
        over("token_set_lengths", list(cfg.token_set_lengths), f"{limits.max_token_set_length} tokens (16 depths)",
             flags["max_token_set_length"])
    budgets: tuple[tuple[str, float], ...] = (("max_search_seconds", limits.max_search_seconds),
                                              ("max_search_tokens", limits.max_search_tokens))
    for name, budget in budgets:
        value: float = getattr(cfg, name)
        if budget and (value == 0 or value > budget):
            over(name, value if value else "0 (none)", budget, flags[name])
    return cfg


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
             "list_type": "a list", "dict_type": "a JSON object", "model_type": "a JSON object",
             "model_attributes_type": "a JSON object"}


def _field_error(err: ValidationError) -> RequestError:
    """What pydantic found, as one line naming the field: the deepest problem, and where a value
    may take several types (a union), each of them ("must be a string or a list")."""
    found = []
    for error in err.errors():
        loc = [str(p) for p in error["loc"] if not (isinstance(p, str) and (
            p in _UNION_TAGS or "[" in p or p.startswith(("function-", "constrained-"))))]
        found.append((".".join(loc), error))
    depth = max(where.count(".") for where, _ in found)
    where, first = next((w, e) for w, e in found if w.count(".") == depth)
    if first["type"] == "missing":
        return RequestError(400, f"missing '{where}'", param=where)
    if first["type"] == "extra_forbidden":
        return RequestError(400, f"unknown field '{where}'", param=where)
    kinds = [_EXPECTED[e["type"]] for w, e in found if w == where and e["type"] in _EXPECTED]
    if kinds and first["type"] in _EXPECTED:
        message = "must be " + " or ".join(dict.fromkeys(kinds))
    else:
        message = first["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    return RequestError(400, f"invalid '{where}': {message}", param=where)


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


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
        if _has_surrogate(m["content"]):
            raise RequestError(400, f"message {i}: content holds an unpaired UTF-16 surrogate (not valid text)",
                               param="messages")
    try:
        as_messages(out)
    except RainError as err:
        raise RequestError(400, str(err), param="messages") from None
    return out[0]["content"] if len(out) == 1 else out


def _text_prompt(prompt: str, limits: Limits) -> Prompt:
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > limits.max_prompt_bytes:
        raise RequestError(400, f"prompt too long: {size} bytes, over this server's {limits.max_prompt_bytes} "
                           f"(rain serve {Limits.FLAGS['max_prompt_bytes']})", param="prompt")
    if _has_surrogate(prompt):
        raise RequestError(400, "'prompt' holds an unpaired UTF-16 surrogate (not valid text)", param="prompt")
    try:
        as_messages(prompt)
    except RainError as err:
        raise RequestError(400, str(err), param="prompt") from None
    return prompt


# ---------------------------------------------------------------------------------------------- stop strings
def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins (None: none there)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether one was there."""
    at = first_stop(text, stops)
    return (text, False) if at is None else (text[:at], True)


def sendable(text: str, stops: tuple[str, ...]) -> str:
    """What of a growing `text` can be streamed now: up to its first stop string, and short of any
    end that may turn out to begin one."""
    text, cut = cut_at_stop(text, stops)
    if cut or not stops:
        return text
    held = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
    return text[:len(text) - held]


# ---------------------------------------------------------------------------------------------- responses
def finish_reason(token_ids: list[int], stop_ids: frozenset[int], max_new_tokens: int) -> str:
    if token_ids and token_ids[-1] in stop_ids:
        return "stop"
    return "length" if len(token_ids) >= max_new_tokens else "stop"  # else: a transcript's turn ended


def response_body(job: Job, out: Any, text: str, finish: str, model_name: str) -> dict[str, Any]:
    """An OpenAI chat.completion or text_completion object for a finished job (its text cut at a
    stop string); RAIN's figures under the extra key 'rain'."""
    prompt_tokens = out.stats.prompt_tokens
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        "id": job.id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": model_name,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(out.token_ids),
                  "total_tokens": prompt_tokens + len(out.token_ids)},
        "rain": {"method": out.method, "stats": out.stats.to_dict()},
    }


def chunk(job: Job, model_name: str, text: str | None = None, finish: str | None = None, *, role: bool = False,
          **extra: Any) -> dict[str, Any]:
    """One event of a streamed answer: a chat.completion.chunk (the role first, then content) or a
    text_completion piece."""
    if job.kind == "chat":
        delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice, kind = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}, "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": model_name, "choices": [choice], **extra}
