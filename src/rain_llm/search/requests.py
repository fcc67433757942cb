"""What the search asks of a model, as typed requests (it yields them; the runtime answers).

Token ids only: the search never sees a prompt, a tensor or a backend. Each request's reply is
what `RainSearch` receives back from its `yield`.
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


SearchRequest = Expand | Propose | Value | EmbedSpans | Complete
