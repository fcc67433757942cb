"""What steers RAIN: the value of a partial answer, in [-1, 1]. Pluggable.

- "self" (the paper): the policy model's own self-evaluation (`SelfEvaluator`);
- "judge:MODEL": the same self-evaluation prompt, read from a separate judge model;
- "reward:MODEL": a Hugging Face sequence-classification reward model (tanh of its score);
- "vader" / "afinn": lexicon sentiment scorers (a signal small models cannot give themselves);
- any Python callable `fn(prompt, response) -> float` through the API.

A value source is bound to one prompt (`bind(prompt)`) and returns an evaluator. A model's
evaluator (`SelfEvaluator`) has a `backend` that judges and builds the requests the runtime sends
it (`request(response)`, read back by `value_from`), and names what that backend should keep
cached (`retain(response)`); any other evaluator has `value(response) -> float`, computed at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from rain_llm.errors import RainError
from rain_llm.runtime.backend import Backend
from rain_llm.runtime.text import Codec
from rain_llm.values.templates import SelfEvaluator, Template


class Evaluator(Protocol):
    def value(self, response: str) -> float: ...


class ValueSource(Protocol):
    name: str

    def bind(self, prompt: str) -> Evaluator | SelfEvaluator: ...


class SelfEvaluation:
    """The paper's value: a model (the policy itself, or a judge) judges the answer with a
    multiple-choice template."""

    def __init__(self, backend: Backend, codec: Codec, template: Template, *, chat: bool, mode: str,
                 chat_template: Any = None, name: str = "self"):
        self.backend, self.codec, self.template, self.chat, self.mode = backend, codec, template, chat, mode
        self.chat_template = chat_template
        self.name = name

    def bind(self, prompt: str) -> SelfEvaluator:
        return SelfEvaluator(self.backend, self.codec, self.template, prompt, chat=self.chat, mode=self.mode,
                             chat_template=self.chat_template)


class _Fixed:
    """An evaluator from a plain function of the response."""

    def __init__(self, fn: Callable[[str], float]):
        self.fn = fn

    def value(self, response: str) -> float:
        v = float(self.fn(response))
        if not math.isfinite(v):
            raise RainError(f"value function returned {v}")
        return max(-1.0, min(1.0, v))


class CallableValue:
    """Any `fn(prompt, response) -> float in [-1, 1]` (clipped)."""

    def __init__(self, fn: Callable[[str, str], float], name: str = "callable"):
        self.fn, self.name = fn, name

    def bind(self, prompt: str) -> _Fixed:
        return _Fixed(lambda response: self.fn(prompt, response))


class LexiconSentiment:
    """VADER compound score or AFINN (scaled by tanh(score / 5)) of the response alone."""

    def __init__(self, kind: str):
        if kind == "vader":
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            analyzer = SentimentIntensityAnalyzer()
            self.score = lambda text: analyzer.polarity_scores(text)["compound"]
        elif kind == "afinn":
            from afinn import Afinn

            afinn = Afinn()
            self.score = lambda text: math.tanh(afinn.score(text) / 5.0)
        else:
            raise RainError(f"unknown lexicon {kind!r} (vader or afinn)")
        self.name = kind

    def bind(self, prompt: str) -> _Fixed:
        return _Fixed(self.score)


class RewardModelValue:
    """A sequence-classification reward model scoring (prompt, response); tanh squashes it to [-1, 1]."""

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForSequenceClassification.from_pretrained(model).to(device).eval()
        except (OSError, ValueError) as err:
            raise RainError(f"cannot load reward model {model!r}: {str(err).splitlines()[0]}") from None
        self.name = f"reward:{model}"

    def bind(self, prompt: str) -> _Fixed:
        import torch

        def score(response: str) -> float:
            batch = self.tokenizer(prompt, response, return_tensors="pt", truncation=True).to(self.model.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits[0]
            raw = float(logits[-1] - logits[0]) if logits.numel() > 1 else float(logits[0])
            return math.tanh(raw)

        return _Fixed(score)


def build_value_source(spec: str | Callable[[str, str], float], *, backend: Backend, codec: Codec,
                       template: Template, chat: bool, mode: str, chat_template: Any, device: str = "cpu",
                       load_judge: Callable[[str], Any] | None = None) -> ValueSource:
    """Turn a config string (`RainConfig.value`) or a callable into a value source. `backend` and
    `codec`: the policy model's ("self"); `load_judge(name)` loads another model ("judge:NAME")
    and returns an object with its `backend` (a cache scope of its own), `codec` and `tokenizer`."""
    if callable(spec):
        return CallableValue(spec)
    if spec == "self":
        return SelfEvaluation(backend, codec, template, chat=chat, mode=mode, chat_template=chat_template)
    if spec in ("vader", "afinn"):
        return LexiconSentiment(spec)
    if spec.startswith("reward:"):
        return RewardModelValue(spec.split(":", 1)[1], device=device)
    if spec.startswith("judge:") and load_judge is not None:
        from rain_llm.runtime.prompts import chat_wrapper, has_chat_template

        judge = load_judge(spec.split(":", 1)[1])
        judge_chat = has_chat_template(judge.tokenizer) and chat
        return SelfEvaluation(judge.backend, judge.codec, template, chat=judge_chat, mode=mode,
                              chat_template=chat_wrapper(judge.tokenizer) if judge_chat else None, name=spec)
    raise RainError(f"unknown value source {spec!r} (self, judge:MODEL, reward:MODEL, vader, afinn)")
