"""How a prompt becomes the model's context, and where its answer ends.

Chat models (a tokenizer with a chat template) get their chat template; base models get a
plain transcript, "Human: ...\\n\\nAssistant:", optionally after a few-shot preamble as in the
paper. A transcript's answer ends where the model starts a new "Human:" turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import RainError

TURN_MARKER = "Human:"


@dataclass(frozen=True)
class PromptFormat:
    chat: bool
    preamble: str = ""

    def render(self, tokenizer: Any, prompt: str) -> list[int]:
        if self.chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = f"{self.preamble}Human: {prompt.strip()}\n\nAssistant:"
        return list(tokenizer(text)["input_ids"])

    def clean(self, answer: str) -> str:
        """The answer text as shown: a transcript's answer stops before a new user turn."""
        if not self.chat:
            cut = answer.find(TURN_MARKER)
            if cut >= 0:
                answer = answer[:cut]
        return answer.strip()

    def ended(self, answer: str) -> bool:
        return not self.chat and TURN_MARKER in answer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_format(tokenizer: Any, kind: str, fewshot: str) -> PromptFormat:
    chat = has_chat_template(tokenizer) if kind == "auto" else kind == "chat"
    if chat and not has_chat_template(tokenizer):
        raise RainError("prompt_format=chat, but the tokenizer has no chat template")
    preamble = ""
    if fewshot and not chat:
        if fewshot == "default":
            preamble = resources.files("rain_llm").joinpath("templates/fewshot_chat.txt").read_text()
        else:
            path = Path(fewshot)
            if not path.is_file():
                raise RainError(f"few-shot file not found: {fewshot}")
            preamble = path.read_text()
        preamble = preamble.rstrip() + "\n\n"
    return PromptFormat(chat=chat, preamble=preamble)


def chat_wrapper(tokenizer: Any):
    """A function rendering one user message with the chat template, as text."""

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    return render
