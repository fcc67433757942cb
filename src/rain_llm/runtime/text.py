"""Text and token ids for one model: its tokenizer and the ids that end a turn.

Backends work in token ids only; the runtime turns prompts and answers into ids and back here,
with the same tokenizer whatever engine runs the model.

User text never becomes control tokens. A Hugging Face tokenizer turns the text of a special
token ("<|im_end|>") into that token wherever it occurs, so a prompt could close its own turn
and open an assistant turn, in the policy's prompt or inside the self-evaluation prompt (and so
write the judge's answer). Template text is encoded with its markers (`encode`); text a user or
the model wrote with `encode_user`, which keeps special-token strings as plain text. `rendered`
assembles a template around user spans that way.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rain_llm.errors import RainError


class Codec:
    """A Hugging Face tokenizer seen as encode/decode, plus the model's end-of-turn ids."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        # one call at a time: a fast tokenizer's options (split_special_tokens) are switched per call,
        # and answers are prepared on other threads than the one that runs the model (the server)
        self._lock = threading.Lock()
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.markers = sorted({str(getattr(t, "content", t)) for t in added.values()} |
                              set(getattr(tokenizer, "all_special_tokens", ())), key=len, reverse=True)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of template text (its special-token strings are the tokenizer's markers);
        `special` adds the tokenizer's own start tokens (e.g. BOS)."""
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def has_markers(self, text: str) -> bool:
        """Whether `text` holds the text of a special (or added) token."""
        return any(marker and marker in text for marker in self.markers)

    def encode_user(self, text: str) -> list[int]:
        """Token ids of text a user or a model wrote: special-token strings stay plain text."""
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def rendered(self, render: Callable[[list[str]], str], spans: Sequence[str], *, special: bool) -> list[int]:
        """Token ids of a template filled with user spans: `render(placeholders)` gives the
        template's text with one random placeholder per span (user text cannot contain it); the
        template's text is encoded with its markers (`special`: with the tokenizer's start
        tokens), each span with `encode_user`. When no span holds a special-token string this is
        the plain encoding of the filled text (the same ids a whole-text encoding gives)."""
        if not any(self.has_markers(span) for span in spans):
            return self.encode(render(list(spans)), special=special)
        holders = [f"\x00{secrets.token_hex(8)}\x00" for _ in spans]
        text = render(holders)
        ids: list[int] = []
        for holder, span in zip(holders, spans):
            before, found, text = text.partition(holder)
            if not found:
                raise RainError("the chat template rewrites message text, so special-token strings in it cannot be "
                                "kept from becoming control tokens")
            ids += self.encode(before, special=special and not ids) + self.encode_user(span)
        return ids + self.encode(text, special=special and not ids)

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and the generation config's (often a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    return sorted(ids)
