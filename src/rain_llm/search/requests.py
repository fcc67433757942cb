"""Everything the search says to the runtime, as typed requests (it yields them; the runtime answers).

Token ids only: the search never sees a prompt, a tensor or a backend. Each request's reply is
what `RainSearch` receives back from its `yield`. Model work (Expand, Propose, Value, EmbedSpans,
Complete) and the two things only the runtime can act on: a commit (`Commit`: what the answer's
caches must keep) and the end of a round (`Checkpoint`: the search's status out, whether the
answer's compute budget is spent back in). So the search has no side channel to the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

Tokens = tuple[int, ...]
Candidates = list[tuple[Tokens, float]]  # token sets with their (unnormalised) sequence probabilities


@dataclass(frozen=True)
class ExpandJob:
    """Candidate token sets to follow `answer`. length 1: the `candidates` most likely tokens;
    longer: the greedy set plus up to `attempts` sampled sets, duplicates dropped, at most
    `candidates` in all. Sets may be shorter where they end the answer."""

    answer: Tokens
    length: int
    candidates: int
    attempts: int


@dataclass
class Expansion:
    candidates: Candidates
    rollout: Tokens  # sampled after the leaf up to the next punctuation mark (empty where it ends one)


@dataclass
class Expand:
    """Expand leaves: candidates and a rollout each. Reply: list[Expansion], in order."""

    jobs: list[ExpandJob]


@dataclass
class Propose:
    """More candidates for a node (dynamic node addition), no rollout. Reply: Candidates."""

    job: ExpandJob


@dataclass
class Value:
    """Self-evaluation of each answer text, in [-1, 1]. Reply: list[float]."""

    answers: list[Tokens]


@dataclass
class EmbedSpans:
    """Sentence embeddings of token spans. Reply: an array, one row per span."""

    spans: list[Tokens]


@dataclass
class Complete:
    """Finish `answer` by plain decoding (the compute budget is spent). Reply: the tokens added."""

    answer: Tokens


@dataclass
class Commit:
    """The answer so far is fixed (RAIN never revises a commit): what does not extend it may be
    freed. Reply: None."""

    answer: Tokens


@dataclass(frozen=True)
class SearchStatus:
    """Where a search stands, after a round: the `step`-th commit is being chosen, `iteration`
    rounds' leaves done of this step's `budget` (at least `fresh` new ones per step, up to `t_max`
    visits of the root counting the `visits_before` kept from the previous step)."""

    step: int
    iteration: int
    budget: int
    visits_before: int
    t_max: int
    fresh: int
    nodes: int
    answer_tokens: int


@dataclass
class Checkpoint:
    """Before the first round and after every round: the search's status (None before any round).
    Reply: whether the answer's compute budget (tokens processed, seconds) is spent; then the
    search commits its best path and asks to `Complete` the answer."""

    status: SearchStatus | None


SearchRequest = Expand | Propose | Value | EmbedSpans | Complete | Commit | Checkpoint
