"""RAIN's model requests as vLLM `/v1/completions` bodies, and the replies read back.

Token ids in and out (`prompt` as ids, `return_token_ids`), so no text crosses the wire. Every body
holds one prompt and asks for one choice: the server's usage then says exactly what it computed
for that body (prompt tokens it did not find cached, plus the generated ones; with several prompts
or choices in one body vLLM 0.32 reports one prompt's cached count only).

  SampleRows  one body per row: a greedy row at temperature 0; a sampled row with its temperature,
              top-k and a seed from the answer's own uniforms (the same alone or in any batch).
              `logprobs` = the row's top_k: its log-probability under its own warped distribution
              (logits / T, top-k, renormalised, as `engine.hf.stream.sample`) is computed here from
              the raw top logprobs at each position. Rollouts stop on `stop_token_ids`: every id whose
              text ends with a stop char; markers go in `stop`. The model's stop ids end every row.
  TopTokens   max_tokens 1, temperature 0, `logprobs` n: the n most likely (id, logprob).
  Score       one body per suffix, `logprob_token_ids` = the options (never `prompt_logprobs`, which
              skips the prefix cache).
  Prefill     nothing is sent: the server caches a prefix on first use.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rain_llm.errors import EngineRefused
from rain_llm.runtime.backend import ModelRequest, Prefill, Row, Sample, SampleRows, Score, TextStop, TopTokens
from rain_llm.runtime.text import Codec

SEED_SPACE = 1 << 52  # seeds drawn from the uniforms; row i of a request samples with seed + i
PLAIN = {"top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


@dataclass
class Plan:
    """A request's bodies (one prompt, one choice each) and how to read their replies into its result."""

    bodies: list[dict[str, Any]]
    read: Callable[[list[Any]], Any]


class Wire:
    """The translation for one model and tokenizer (`codec`: its stop ids end every row)."""

    def __init__(self, model: str, codec: Codec):
        self.model = model
        self.codec = codec
        self.vocab = len(codec.tokenizer)
        self._ending: dict[str, frozenset[int]] = {}
        self._lock = threading.Lock()

    def plan(self, request: ModelRequest, salt: str | None = None) -> Plan:
        """The bodies for `request`; EngineRefused for one this client cannot express."""
        if isinstance(request, Prefill):
            plan = Plan([], lambda replies: None)
        elif isinstance(request, SampleRows):
            plan = self._rows(request)
        elif isinstance(request, TopTokens):
            _check(request.context)
            n = request.n
            plan = Plan([{"prompt": list(request.context), "max_tokens": 1, "temperature": 0.0, "logprobs": n}],
                        lambda replies: top_tokens(replies[0], n))
        elif isinstance(request, Score):
            if not request.prefix or not request.suffixes or not all(request.suffixes):
                raise EngineRefused("evaluation prompt and its suffixes must not be empty")
            options = [int(o) for o in request.option_ids]
            # `logprobs` must be set with logprob_token_ids, but its value is ignored: 1 passes any --max-logprobs
            plan = Plan([{"prompt": list(request.prefix) + list(s), "max_tokens": 1, "temperature": 0.0,
                          "logprobs": 1, "logprob_token_ids": sorted(set(options))} for s in request.suffixes],
                        lambda replies: option_probs(replies, options))
        else:
            raise EngineRefused(f"{type(request).__name__} is not a request for a language model")
        for body in plan.bodies:
            body |= {"model": self.model, "n": 1, "return_token_ids": True, "return_tokens_as_token_ids": True}
            if salt is not None:  # nothing cached by requests with another salt is used (a fresh cache)
                body["cache_salt"] = salt
        return plan

    def _rows(self, request: SampleRows) -> Plan:
        _check(request.context)
        seed = self._seed(request)
        bodies = []
        for r, row in enumerate(request.rows):
            top_k = self.top_k(row)
            body: dict[str, Any] = {"prompt": list(request.context), "max_tokens": row.max_tokens, **PLAIN,
                                    "logprobs": top_k, "stop_token_ids": sorted(self._stops(row.stop))}
            if row.greedy:
                body["temperature"] = 0.0
            else:
                body |= {"temperature": row.temperature, "top_k": top_k, "seed": seed + r}
            if row.stop is not None and row.stop.markers:
                body["stop"] = list(row.stop.markers)
            bodies.append(body)

        def read(replies: list[Any]) -> list[Sample]:
            out = []
            for row, reply in zip(request.rows, replies):
                (choice,) = choices(reply, 1)
                tokens = [int(t) for t in choice["token_ids"]]
                out.append(Sample(tokens, row_logprob(choice, tokens, row.temperature, self.top_k(row))))
            return out

        return Plan(bodies, read)

    def top_k(self, row: Row) -> int:
        """The row's top-k (0: off); a row's log-probability needs the top-k raw logprobs, or the
        sampled token's alone at temperature 1 without top-k. A rollout's is never read."""
        top_k = row.top_k if 0 < row.top_k < self.vocab else 0
        if top_k == 0 and row.temperature != 1.0 and row.stop is None:
            raise EngineRefused(f"the vLLM backend cannot compute log-probabilities at temperature "
                                f"{row.temperature} without top-k (the server returns only the top --max-logprobs "
                                "tokens): set top_k, or use temperature 1")
        return top_k

    def _stops(self, stop: TextStop | None) -> frozenset[int]:
        ids = self.codec.stop_ids
        return ids | self.ending_with(stop.chars) if stop is not None and stop.chars else ids

    def ending_with(self, chars: str) -> frozenset[int]:
        """Every vocabulary id whose decoded text ends with one of `chars` (once per char set)."""
        with self._lock:
            found = self._ending.get(chars)
        if found is None:
            texts = (self.codec.decode([i]) for i in range(self.vocab))  # ~0.25 s for 49k ids
            found = frozenset(i for i, text in enumerate(texts) if text and text[-1] in chars)
            with self._lock:
                self._ending[chars] = found
        return found

    @staticmethod
    def _seed(request: SampleRows) -> int:
        """A seed from the rows' own uniforms (the answer's random stream: the same alone or in any
        batch); rows without uniforms get one from the request's id."""
        if request.uniforms is not None:
            data = np.ascontiguousarray(np.asarray(request.uniforms, dtype=np.float64)).tobytes()
        else:
            data = str(request.id).encode()
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") % SEED_SPACE


# ---------------------------------------------------------------------------------------------- replies
def _check(context: Sequence[int]) -> None:
    if not context:
        raise EngineRefused("empty context: nothing to condition on")


def token_id(key: str) -> int:
    """The id in a `top_logprobs` key (requests ask for "token_id:<id>" keys)."""
    return int(key.rsplit(":", 1)[1])


def choices(reply: Any, count: int) -> list[dict[str, Any]]:
    found = sorted(reply["choices"], key=lambda c: c["index"])
    if len(found) != count:
        raise ValueError(f"{len(found)} choices, {count} asked for")
    return found


def processed(reply: Any) -> int:
    """Token positions the server ran for a reply of one prompt and one choice: the prompt tokens
    it did not find cached, plus the generated ones (without --enable-prompt-tokens-details the
    server reports no cached count: the whole prompt counts)."""
    usage = reply.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return prompt - min(cached, prompt) + int(usage.get("completion_tokens", 0))


def row_logprob(choice: dict[str, Any], tokens: list[int], temperature: float, top_k: int) -> float:
    """Log-probability of a row's tokens under its own sampling distribution: raw logprobs / T,
    renormalised over the top k (the raw top-k logprobs of each position come with the reply);
    without top-k, at T = 1, the raw logprobs themselves (NaN otherwise: only rollouts and greedy
    rows without top-k get there, and their log-probability is never read)."""
    logprobs = choice["logprobs"]
    if top_k == 0:
        return float(sum(logprobs["token_logprobs"])) if temperature == 1.0 else math.nan
    total = 0.0
    for token, top in zip(tokens, logprobs["top_logprobs"]):
        raw = {token_id(k): float(v) for k, v in top.items()}
        scaled = np.sort(np.fromiter(raw.values(), dtype=np.float64))[::-1][:top_k] / temperature
        peak = float(scaled[0])
        total += raw[token] / temperature - (peak + math.log(float(np.exp(scaled - peak).sum())))
    return float(total)


def top_tokens(reply: Any, n: int) -> list[tuple[int, float]]:
    """The n most likely (id, logprob) at the first position, most likely first, ties lower id first."""
    (choice,) = choices(reply, 1)
    top = choice["logprobs"]["top_logprobs"][0]
    return sorted(((token_id(k), float(v)) for k, v in top.items()), key=lambda p: (-p[1], p[0]))[:n]


def option_probs(replies: list[Any], options: list[int]) -> np.ndarray:
    """(suffixes, options) probabilities from each body's first-position logprobs of the options."""
    out = np.zeros((len(replies), len(options)), dtype=np.float64)
    for i, reply in enumerate(replies):
        (choice,) = choices(reply, 1)
        top = {token_id(k): float(v) for k, v in choice["logprobs"]["top_logprobs"][0].items()}
        out[i] = [math.exp(top[o]) for o in options]
    return out
