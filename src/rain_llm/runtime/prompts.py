"""How a prompt becomes the model's context, and where its answer ends.

Chat models (a tokenizer with a chat template) get their chat template; base models get a
plain transcript, "Human: ...\\n\\nAssistant:", optionally after a few-shot preamble as in the
paper. A transcript's answer ends where the model starts a new "Human:" turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rain_llm.errors import RainError
from rain_llm.runtime.text import Codec

TURN_MARKER = "Human:"
ROLES = ("system", "user", "assistant")
Prompt = str | Sequence[dict[str, str]]  # one user message, or a conversation ending with a user turn


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as chat messages, checked: system messages first, then user and assistant
    turns, the last one the user's, none empty. Raises RainError naming the problem."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RainError("empty prompt: give some text to answer")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list | tuple) or not prompt:
        raise RainError("a prompt is a string or a non-empty list of messages")
    seen_turn = False
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RainError(f"message {i}: needs a 'role' and a text 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RainError(f"message {i}: unknown role {role!r} (system, user or assistant)")
        if role == "system" and seen_turn:
            raise RainError(f"message {i}: system messages must come before the conversation")
        seen_turn = seen_turn or role != "system"
    if prompt[-1]["role"] != "user":
        raise RainError("the last message must be the user's: RAIN answers a user turn")
    if not prompt[-1]["content"].strip():
        raise RainError("empty prompt: the last user message has no text")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def user_request(prompt: Prompt) -> str:
    """The text the answer responds to (the last user message): what evaluators judge it against."""
    return prompt if isinstance(prompt, str) else as_messages(prompt)[-1]["content"]


@dataclass(frozen=True)
class PromptFormat:
    chat: bool
    preamble: str = ""

    def render(self, codec: Codec, prompt: Prompt) -> list[int]:
        """The model's context for `prompt`: the chat template, or the transcript. The messages'
        text is the user's: special-token strings in it stay text (`Codec.rendered`)."""
        messages = as_messages(prompt)
        tokenizer = codec.tokenizer
        if self.chat:
            def chat(contents: list[str]) -> str:
                filled = [{"role": m["role"], "content": c} for m, c in zip(messages, contents)]
                return str(tokenizer.apply_chat_template(filled, add_generation_prompt=True, tokenize=False))

            return codec.rendered(chat, [m["content"] for m in messages], special=False)

        def transcript(contents: list[str]) -> str:
            text = self.preamble + "".join(f"{c}\n\n" for m, c in zip(messages, contents) if m["role"] == "system")
            for m, c in zip(messages, contents):
                if m["role"] == "user":
                    text += f"Human: {c}\n\nAssistant:"
                elif m["role"] == "assistant":
                    text += f" {c}\n\n"
            return text

        return codec.rendered(transcript, [m["content"].strip() for m in messages], special=True)

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


def chat_wrapper(tokenizer: Any) -> Callable[[str], str]:
    """A function rendering one user message with the chat template, as text."""

    def render(content: str) -> str:
        return str(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False))

    return render
