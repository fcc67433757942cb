"""Text and token ids for one model: its tokenizer and the ids that end a turn.

Backends work in token ids only; the runtime turns prompts and answers into ids and back here,
with the same tokenizer whatever engine runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Codec:
    """A Hugging Face tokenizer seen as encode/decode, plus the model's end-of-turn ids."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`; `special` adds the tokenizer's own start tokens (e.g. BOS)."""
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


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
