"""What the model work cost: a receipt per request, summed per answer at the edge.

A backend fills one `Receipt` per request it runs (the forward passes it took part in, the token
positions run for it, its share of the time, its phase and model). The scheduler charges each
receipt to the answer that asked (`Compute.charge`), so an answer's figures are its own whatever
else shared the batch; a batch's figures are its answers' merged (`Compute.merged`): tokens add
up (every position is charged to exactly one request), forward passes are counted once each
(receipts name them by id). Nothing outside the scheduler resets anything.

`LeastWork` is the yardstick: the distinct token positions an answer asked the model about, each
counted once; set beside the tokens processed, it shows the waste.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)  # hashed by identity: the engine keeps the receipts a call touched in a set
class Receipt:
    """The work one request caused, filled in by the backend that ran it."""

    phase: str
    model: str = ""
    forwards: set[tuple[int, int]] = field(default_factory=set)  # (backend id, forward number)
    tokens: int = 0  # token positions run for it: its rows x the positions of each forward, padding included
    seconds: float = 0.0  # its share of the time of the backend calls it took part in
    drafted: int = 0  # speculation: draft tokens fed for it (in `tokens` too), and those a row accepted
    accepted: int = 0
    speculated: int = 0  # positions of `tokens` that one token per forward would not have run (rejected, padding)

    def add(self, forward: tuple[int, int], tokens: int) -> None:
        self.forwards.add(forward)
        self.tokens += tokens


@dataclass
class PhaseCount:
    """One phase's work: requests asked, forward passes taken part in, tokens, seconds."""

    requests: int = 0
    forwards: set[tuple[int, int]] = field(default_factory=set)
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    speculated: int = 0

    @property
    def forward_passes(self) -> int:
        return len(self.forwards)

    def add(self, other: PhaseCount | Receipt, requests: int = 1) -> None:
        self.requests += requests if isinstance(other, Receipt) else other.requests
        self.forwards |= other.forwards
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.speculated += other.speculated


_Trie = dict[int, "_Trie"]


class LeastWork:
    """The least work an answer could have cost: every distinct token position it asked the model
    about (contexts whose logits it needed, rows it decoded, prompts it scored), each once."""

    def __init__(self) -> None:
        self.root: _Trie = {}
        self.tokens = 0

    def add(self, sequence: Sequence[int], *, count: bool = True) -> None:
        """Note positions asked about; `count=False` for ones an earlier answer left cached."""
        node = self.root
        for token in sequence:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                self.tokens += int(count)
            node = child


class Compute:
    """Work per phase (from receipts) and the least work, of one answer or of a whole batch."""

    def __init__(self) -> None:
        self.phases: dict[str, PhaseCount] = {}
        self.least = LeastWork()
        self.least_tokens = 0  # of merged answers (their least work is per answer, summed)

    def charge(self, receipt: Receipt) -> None:
        self.phases.setdefault(receipt.phase, PhaseCount()).add(receipt)

    def asked(self, sequences: Iterable[Sequence[int]]) -> None:
        for sequence in sequences:
            self.least.add(sequence)

    @classmethod
    def merged(cls, parts: Iterable[Compute]) -> Compute:
        """A batch's work from its answers': tokens and seconds add, each forward pass counts once."""
        out = cls()
        for part in parts:
            for name, count in part.phases.items():
                out.phases.setdefault(name, PhaseCount()).add(count)
            out.least_tokens += part.least_work
        return out

    @property
    def lm_tokens(self) -> int:
        """Token positions the language models processed (all phases but the sentence embedder's)."""
        return sum(c.tokens for name, c in self.phases.items() if name != "embed")

    @property
    def budget_tokens(self) -> int:
        """What `max_search_tokens` counts: `lm_tokens` less what speculation ran beyond one token per
        forward (rejected drafts, padding), so a budget stops a search at the same place with
        speculation on or off."""
        return self.lm_tokens - sum(c.speculated for name, c in self.phases.items() if name != "embed")

    @property
    def lm_forwards(self) -> int:
        """Forward passes of the language models (every phase but the embedder's), each counted once:
        with one answer in flight, the sequential forwards its search took."""
        return len(set().union(*(c.forwards for name, c in self.phases.items() if name != "embed")))

    @property
    def least_work(self) -> int:
        return self.least.tokens + self.least_tokens

    def total(self) -> PhaseCount:
        total = PhaseCount()
        for count in self.phases.values():
            total.add(count)
        return total

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `stats["compute"]`: per phase requests, forward passes, tokens and seconds;
        the total (a forward pass serving several phases counts once; the language models' alone too);
        the least work."""
        out: dict[str, Any] = {name: {"requests": c.requests, "forward_passes": c.forward_passes, "tokens": c.tokens,
                                      "seconds": round(c.seconds, 4)} for name, c in sorted(self.phases.items())}
        total = self.total()
        out["total"] = {"forward_passes": total.forward_passes, "tokens": total.tokens,
                        "lm_forward_passes": self.lm_forwards}
        if total.drafted:  # speculation: draft tokens fed, and those accepted
            out["total"] |= {"draft_tokens": total.drafted, "accepted_draft_tokens": total.accepted,
                             "speculated_tokens": total.speculated}
        if self.least_work:
            out["least_work"] = {"tokens": self.least_work}
        return out


def lm_tokens_of(compute: dict[str, Any]) -> int:
    """`Compute.lm_tokens` read back from its JSON shape (`to_dict`, e.g. a stored record): every
    phase's tokens but the sentence embedder's."""
    return sum(c.get("tokens", 0) for name, c in compute.items()
               if name not in ("total", "least_work", "embed") and isinstance(c, dict))
