"""Self-evaluation: the model judges its own answer so far by a fixed multiple-choice prompt.

A template is a TOML file with `template` (text holding {prompt}, {response}, {option_a},
{option_b}, the response before the options), `good` and `bad` (option texts) and
`answer_prefix` (after which the option letter is read, e.g. "The answer is: (").
Both option orders are scored as one batch; the value is in [-1, 1]:
  vote: the official rule, one vote per order for the good option (-1, 0 or 1);
  mean: the good option's probability (normalised over the two letters), averaged over the
        orders and rescaled, a continuous value that separates answers the vote ties.
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Hashable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rain_llm.errors import RainError
from rain_llm.runtime.backend import Backend, Score
from rain_llm.runtime.scheduler import run_requests
from rain_llm.runtime.text import Codec

BUILTIN_TEMPLATES = ("harmlessness", "truthfulness", "sentiment")
PLACEHOLDERS = ("{prompt}", "{response}", "{option_a}", "{option_b}")


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    good: str
    bad: str
    answer_prefix: str = "The answer is: ("
    letters: tuple[str, str] = ("A", "B")

    def split(self) -> tuple[str, str]:
        """(text before the response, text after it) with {prompt} still to fill."""
        before, _, after = self.text.partition("{response}")
        return before, after


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a template .toml file; validated."""
    if name_or_path in BUILTIN_TEMPLATES:
        raw = resources.files("rain_llm").joinpath(f"templates/{name_or_path}.toml").read_text()
        source = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise RainError(f"unknown template {name_or_path!r}: not one of {', '.join(BUILTIN_TEMPLATES)} "
                            "and no such file")
        raw, source = path.read_text(), str(path)
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as err:
        raise RainError(f"template {source} is not valid TOML: {err}") from None
    for key in ("template", "good", "bad"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise RainError(f"template {source} lacks the key {key!r}")
    text = data["template"]
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise RainError(f"template {source} lacks the placeholder(s) {', '.join(missing)}")
    if text.index("{response}") > text.index("{option_a}"):
        raise RainError(f"template {source}: {{response}} must come before the options")
    letters = tuple(data.get("letters", ("A", "B")))
    if len(letters) != 2 or letters[0] == letters[1]:
        raise RainError(f"template {source}: letters must be two different strings")
    return Template(name=data.get("name", Path(source).stem), text=text, good=data["good"], bad=data["bad"],
                    answer_prefix=data.get("answer_prefix", "The answer is: ("),
                    letters=(str(letters[0]), str(letters[1])))


def option_token_ids(codec: Codec, answer_prefix: str, letters: tuple[str, str]) -> tuple[int, int]:
    """The token each option letter becomes right after `answer_prefix`, from the tokenizer."""
    base = codec.encode(answer_prefix)
    ids = []
    for letter in letters:
        full = codec.encode(answer_prefix + letter)
        extra = full[len(base):] if full[:len(base)] == base else []
        if len(extra) != 1:  # the letter merged with the prefix or split: fall back to the bare letter
            extra = codec.encode(letter)[-1:]
        ids.append(extra[0])
    if ids[0] == ids[1]:
        raise RainError(f"option letters {letters} map to the same token")
    return ids[0], ids[1]


class SelfEvaluator:
    """Scores answers to one prompt with one template: builds the evaluation requests (`request`)
    that `backend`, the model that judges, answers; its constant prompt prefix stays cached."""

    def __init__(self, backend: Backend, codec: Codec, template: Template, prompt: str, *, chat: bool,
                 mode: str = "vote", chat_template: Any = None):
        self.backend = backend
        self.codec = codec
        self.template = template
        self.mode = mode
        before, after = template.split()
        g, b = template.good, template.bad
        afters = [after.replace("{option_a}", g).replace("{option_b}", b),  # good option listed first
                  after.replace("{option_a}", b).replace("{option_b}", g)]  # harmful option first
        # The evaluation prompt, cut at two random placeholders (no user text can hold them): the
        # constant head (instructions, examples: kept cached across prompts), the prompt, the text
        # between prompt and response, the response; then the options (suffixes).
        p_hold, r_hold = (f"\x00{secrets.token_hex(8)}\x00" for _ in range(2))
        content = (before if "{prompt}" in before else "{prompt}" + before).replace("{prompt}", p_hold) + r_hold
        if "{prompt}" not in before:  # a template that does not quote the prompt
            content = content.replace(p_hold, "")
            p_hold = ""
        if chat:  # the judgement is a user turn; the answer prefix opens the assistant's reply
            rendered = chat_template(content)
            self.afters = [a + rendered.partition(r_hold)[2] + template.answer_prefix for a in afters]
            self.special = False
        else:
            rendered = content
            self.afters = [a + "\n" + template.answer_prefix for a in afters]
            self.special = True
        if r_hold not in rendered or (p_hold and p_hold not in rendered):
            raise RainError("the chat template rewrites message text: the evaluation prompt cannot be assembled")
        head_and_prompt, _, _ = rendered.partition(r_hold)
        parts: tuple[str, str, str] = head_and_prompt.partition(p_hold) if p_hold else (head_and_prompt, "", "")
        self.head, self.mid = parts[0], parts[2]
        self.prompt = prompt.strip() if p_hold else ""
        self.suffix_ids = [codec.encode(a) for a in self.afters]
        self.option_ids = option_token_ids(codec, template.answer_prefix, template.letters)

    def prefix_ids(self, response: str) -> list[int]:
        """Token ids of the evaluation prompt up to the end of `response`. The prompt and the
        response are user (and model) text: special-token strings in them stay text."""
        def text(spans: list[str]) -> str:
            return self.head + spans[0] + self.mid + spans[1]

        return self.codec.rendered(text, [self.prompt, response.strip()], special=self.special)

    def request(self, response: str, owner: Hashable = None) -> Score:
        """The scoring request for `response`: both option orders after its evaluation prompt."""
        return Score(owner, "evaluate", self.prefix_ids(response), self.suffix_ids, self.option_ids)

    def probabilities(self, response: str) -> np.ndarray:
        """[[p(A), p(B)] with the good option as (A), [p(A), p(B)] with the good option as (B)],
        scored at once (outside a search: checks of the evaluator itself)."""
        return run_requests(self.backend, [self.request(response, owner=self)])[0]

    def value(self, response: str) -> float:
        return self.value_from(self.probabilities(response))

    def value_from(self, p: np.ndarray) -> float:
        return value_from_probabilities(p, self.mode)

    def retain(self, response: str) -> list[list[int]]:
        """Token prefixes worth keeping cached: the evaluation prompt up to this response."""
        return [self.prefix_ids(response)[:-1]]

    def constant_ids(self) -> list[int]:
        """The part of the evaluation prompt that no prompt or answer changes: instructions and
        examples, kept cached from one prompt to the next."""
        return self.codec.encode(self.head, special=self.special)[:-1]  # no user text in it


def value_from_probabilities(p: np.ndarray, mode: str) -> float:
    """p[0] = letters' probabilities with good = A; p[1] with good = B. Returns v in [-1, 1]."""
    if mode == "vote":
        votes = int(p[0, 0] > p[0, 1]) + int(p[1, 1] > p[1, 0])
        return float(votes - 1)
    good = p[0, 0] / max(p[0, 0] + p[0, 1], 1e-30) + p[1, 1] / max(p[1, 0] + p[1, 1], 1e-30)
    return float(good - 1)
