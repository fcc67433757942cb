"""The RAIN search: a tree of token sets, PUCT selection, self-evaluation and rewind.

Pure Python and numpy. The search is a generator of typed requests (`requests.py`: expand
leaves, propose more candidates, value answers, embed spans, complete an answer; a commit; a
checkpoint after each round, whose reply says whether the compute budget is spent) and knows the
model only through what it gets back and two pure functions (`SearchEnv`: is an answer finished,
the text of a span), as in DeepMind's mctx; the runtime answers the requests of any number of
searches at once, so batching is never a second code path here.

One inner-loop iteration (`RainSearch.round`, P = 1):
  1. select   from the root down by argmax q_hat + u (adding candidates where siblings are all
              alike and bad: dynamic node addition);
  2. expand   the leaf with k candidate token sets (unless the answer has ended), and continue
              it to the next punctuation mark (rollout);
  3. evaluate the leaf plus rollout by self-evaluation;
  4. rewind   back the value up the path, and to siblings with similar sentence embeddings.
The outer loop (`RainSearch.steps`) commits the most-visited child of the root once it is good
enough, keeps its subtree, and repeats until the answer ends.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rain_llm.config import RainConfig, token_set_length
from rain_llm.search.requests import (
    Candidates,
    Checkpoint,
    Commit,
    Complete,
    EmbedSpans,
    Expand,
    ExpandJob,
    Propose,
    SearchRequest,
    SearchStatus,
    Tokens,
    Value,
)


class SearchEnv(Protocol):
    """Two pure functions of one answer's tokens that the search calls directly (no model work, no
    effects: everything else goes through the requests it yields)."""

    def is_terminal(self, answer: Tokens) -> bool:
        """Whether `answer` is finished (end of turn, token budget, new user turn)."""
        ...

    def decode(self, tokens: Tokens) -> str:
        """Text of a token span (for traces)."""
        ...


Steps = Generator[SearchRequest, Any, "SearchResult"]


@dataclass(eq=False)
class Node:
    """A token set in the tree. `n` counts visits plus similarity credit; `visits` real visits."""

    tokens: Tokens
    depth: int
    prior: float = 0.0
    raw_prob: float = 0.0  # sequence probability before normalisation (for dynamic addition)
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    n: float = 0.0
    visits: int = 0
    q: float = 0.0
    embedding: np.ndarray | None = None
    similarity_updates: int = 0
    dynamic: bool = False
    pending: int = 0  # leaves below chosen in the current parallel round (virtual loss)

    def child_with(self, tokens: Tokens) -> Node | None:
        return next((c for c in self.children if c.tokens == tokens), None)

    def path(self) -> list[Node]:
        """Nodes from the root (excluded) down to self."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class StepRecord:
    """What happened while choosing one committed token set."""

    iterations: int
    committed: Tokens
    visits_before: int
    tree: dict[str, Any] | None = None


@dataclass
class SearchStats:
    steps: int = 0
    iterations: int = 0
    iterations_per_step: list[int] = field(default_factory=list)
    nodes: int = 0
    rewinds: int = 0
    similarity_updates: int = 0
    dynamic_additions: int = 0
    budget_stopped: bool = False  # the compute budget ran out: best path committed, the rest decoded plainly
    completed_tokens: int = 0  # tokens decoded without search after the budget ran out


@dataclass
class SearchResult:
    tokens: Tokens
    stats: SearchStats
    steps: list[StepRecord]


class RainSearch:
    """One RAIN search over one prompt: `steps()` is the whole search, as a generator of requests."""

    def __init__(self, env: SearchEnv, config: RainConfig, *, trace: bool = False):
        self.env = env
        self.cfg = config
        self.trace = trace
        self.spent = False  # the compute budget ran out (the runtime says so at each checkpoint)
        self.root = Node(tokens=(), depth=0)
        self.answer: Tokens = ()  # committed tokens
        self.q_min = config.q_min_init
        self.q_max = config.q_max_init
        self.stats = SearchStats(nodes=1)

    # ------------------------------------------------------------------ outer loop
    def steps(self) -> Steps:
        """The search: yields model requests (see `requests.py`), receives their replies, returns
        the answer. Each committed step runs rounds until t_max visits of the root (at least
        `fresh_iterations` new ones) or until the best child is visited more than t_min times
        with a value above the threshold."""
        steps: list[StepRecord] = []
        self.spent = yield Checkpoint(None)
        while not self.env.is_terminal(self.answer):
            if self.spent:
                yield from self._finish_over_budget(steps)
                break
            visits_before = self.root.visits
            end = max(self.cfg.t_max, visits_before + self.cfg.fresh_iterations)
            done = 0
            while visits_before + done < end:
                if done > 0 and self.spent:
                    break
                done += yield from self.round(max_leaves=end - visits_before - done)
                self.spent = yield Checkpoint(self.status(done, end - visits_before, visits_before))
                best = self.best_child(self.root)
                if best is not None and best.visits > self.cfg.t_min and best.q > self.cfg.value_threshold:
                    break
            best = self.best_child(self.root)
            if best is None:  # only possible if the root could not be expanded at all
                break
            yield from self._commit_step(steps, best, done, visits_before)
        return SearchResult(self.answer, self.stats, steps)

    def _commit_step(self, steps: list[StepRecord], best: Node, iterations: int,
                     visits_before: int) -> Generator[SearchRequest, Any, None]:
        steps.append(StepRecord(iterations=iterations, committed=best.tokens, visits_before=visits_before,
                                tree=self.tree_dict(self.root) if self.trace else None))
        self.stats.steps += 1
        self.stats.iterations_per_step.append(iterations)
        self.commit(best)
        yield Commit(self.answer)

    def _finish_over_budget(self, steps: list[StepRecord]) -> Generator[SearchRequest, Any, None]:
        """The compute budget is spent: commit the best path found so far, then let the model finish
        the answer by plain decoding (no more search)."""
        self.stats.budget_stopped = True
        while not self.env.is_terminal(self.answer) and (best := self.best_child(self.root)) is not None:
            yield from self._commit_step(steps, best, 0, self.root.visits)
        if not self.env.is_terminal(self.answer):
            rest = yield Complete(self.answer)
            self.answer = self.answer + tuple(rest)
            self.stats.completed_tokens = len(rest)

    def best_child(self, node: Node) -> Node | None:
        """Most visited child (n, including similarity credit), ties broken by q (official)."""
        if not node.children:
            return None
        top = max(c.n for c in node.children)
        return max((c for c in node.children if c.n == top), key=lambda c: c.q)

    def commit(self, child: Node) -> None:
        """Make `child` the new root, keep its subtree, re-mix its children's priors."""
        self.answer = self.answer + child.tokens
        child.parent = None
        self.root = child
        self._mix_root_priors([c.prior for c in child.children], child.children)

    # ------------------------------------------------------------------ inner loop
    def round(self, max_leaves: int | None = None) -> Generator[SearchRequest, Any, int]:
        """One round: select P leaves (P = parallel_leaves; virtual loss keeps them apart), expand
        them with their rollouts, evaluate, rewind each. P = 1 is the paper's sequential loop:
        select -> expand (with the rollout) -> evaluate -> rewind. Returns the leaves done."""
        leaves: list[tuple[Node, Tokens]] = []
        for _ in range(min(self.cfg.parallel_leaves, max_leaves or self.cfg.parallel_leaves)):
            node, answer = yield from self._descend()
            if any(node is other for other, _ in leaves):
                break  # virtual loss could not push the selection elsewhere: the tree is too small
            leaves.append((node, answer))
            self._pending(node, +1)
        for node, _ in leaves:
            self._pending(node, -1)
        open_leaves = [(node, answer) for node, answer in leaves if not self.env.is_terminal(answer)]
        jobs = [ExpandJob(answer, token_set_length(self.cfg, node.depth), self.cfg.num_candidates,
                          self.cfg.sample_attempts) for node, answer in open_leaves]
        results = (yield Expand(jobs)) if jobs else []
        expanded = dict(zip((id(n) for n, _ in open_leaves), results))
        rollouts = [expanded[id(node)].rollout if id(node) in expanded else () for node, _ in leaves]
        values = yield Value([answer + r for (_, answer), r in zip(leaves, rollouts)])
        spans = [self._spans(node, rollout) for (node, _), rollout in zip(leaves, rollouts)]
        flat = [span for leaf_spans in spans for span in leaf_spans]
        embedded = (yield EmbedSpans(flat)) if flat else np.zeros((0, 0))
        start = 0
        for (node, _), value, leaf_spans in zip(leaves, values, spans):
            if id(node) in expanded:  # evaluated the leaf (official: before expanding it)
                self.add_children(node, expanded[id(node)].candidates)
            self.backup(node, value, embedded[start:start + len(leaf_spans)])
            start += len(leaf_spans)
        return len(leaves)

    def _descend(self) -> Generator[SearchRequest, Any, tuple[Node, Tokens]]:
        node, answer = self.root, self.answer
        while node.children:
            yield from self._maybe_add_children(node, answer)
            node = self.select(node)
            answer = answer + node.tokens
        return node, answer

    def _pending(self, leaf: Node, delta: int) -> None:
        """Virtual loss: a leaf chosen in this round counts, until backed up, as a visit worth -1."""
        node: Node | None = leaf
        while node is not None:
            node.pending += delta
            node = node.parent

    def select(self, node: Node) -> Node:
        """argmax of q_hat + u over the children (first wins ties); pending leaves count as losses."""
        sqrt_n = math.sqrt(node.n + node.pending)
        span = self.q_max - self.q_min + 1e-5  # official getqu()

        def score(c: Node) -> float:
            n = c.n + c.pending
            q = (c.q * c.n - c.pending) / n if c.pending else c.q
            q_hat = (q - self.q_min) / span if n > 0 else 0.0
            return q_hat + self.cfg.c_puct * c.prior * sqrt_n / (1 + n)

        return max(node.children, key=score)

    def add_children(self, node: Node, candidates: Candidates) -> None:
        """Children with priors = normalised sequence probabilities (mixed with uniform at the root)."""
        probs = np.array([p for _, p in candidates], dtype=np.float64)
        priors = probs / probs.sum() if probs.sum() > 0 else np.full(len(probs), 1 / len(probs))
        if node is self.root:
            priors = self._mix(priors)
        for (tokens, p), prior in zip(candidates, priors):
            node.children.append(Node(tokens=tokens, depth=node.depth + 1, prior=float(prior),
                                      raw_prob=p, parent=node))
        self.stats.nodes += len(candidates)

    @staticmethod
    def _spans(leaf: Node, rollout: Tokens) -> list[Tokens]:
        """What each node on the path to `leaf` embeds: its text from its own first token to the
        end of the rollout (root side first)."""
        spans, suffix = [], rollout
        for node in reversed(leaf.path()):
            suffix = node.tokens + suffix
            spans.append(suffix)
        return spans[::-1]

    def backup(self, leaf: Node, value: float, embeddings: np.ndarray) -> None:
        """Rewind: update the path (running mean) and similar siblings (official nodes.backup).
        `embeddings`: of `_spans(leaf, rollout)`, one row per node on the path."""
        path = leaf.path()
        gamma, threshold = self.cfg.similarity_gamma, self.cfg.similarity_threshold
        for node, emb in zip(reversed(path), embeddings[::-1]):
            node.n += 1
            node.visits += 1
            emb = np.asarray(emb, dtype=np.float64)
            if node.embedding is None:
                node.embedding = emb.copy()
            else:
                node.embedding = node.embedding + (emb - node.embedding) / node.visits
            for sib in node.parent.children:  # type: ignore[union-attr]
                if sib is node or sib.embedding is None:
                    continue
                sim = _cosine(node.embedding, sib.embedding)
                if sim < threshold:
                    continue
                weight = gamma * sim
                before = sib.n
                sib.n += weight
                sib.q = (sib.q * before + weight * value) / sib.n
                sib.similarity_updates += 1
                self.stats.similarity_updates += 1
        for node in reversed(path):  # q after the similarity pass, as the official recursion does
            node.q += (value - node.q) / node.visits
            self.q_min = min(self.q_min, node.q)
            self.q_max = max(self.q_max, node.q)
        self.root.n += 1
        self.root.visits += 1
        self.root.q += (value - self.root.q) / self.root.visits
        self.stats.iterations += 1
        self.stats.rewinds += 1

    def _maybe_add_children(self, node: Node, answer: Tokens) -> Generator[SearchRequest, Any, None]:
        """Dynamic node addition (official checkadd/add): siblings all alike and all bad."""
        cfg = self.cfg
        if len(node.children) >= cfg.dynamic_max_children:
            return
        if any(c.embedding is None for c in node.children):
            return
        variance = np.var(np.stack([c.embedding for c in node.children]), axis=0)  # type: ignore[misc]
        limit = cfg.dynamic_variance_scale * len(node.children[0].tokens)
        if not (np.linalg.norm(variance) < limit and max(c.q for c in node.children) < cfg.dynamic_q_threshold):
            return
        length = token_set_length(cfg, node.depth)
        if length == 1:  # one more of the most likely tokens
            job = ExpandJob(answer, 1, len(node.children) + 1, 0)
        else:  # the greedy set plus fresh samples
            job = ExpandJob(answer, length, cfg.dynamic_extra_samples, cfg.dynamic_extra_samples - 1)
        proposals = yield Propose(job)
        new = [(t, p) for t, p in proposals if node.child_with(t) is None]
        if not new:
            return
        total = sum(c.raw_prob for c in node.children) + sum(p for _, p in new)
        for tokens, p in new:
            prior = p / total if total > 0 else 1.0 / (len(node.children) + 1)
            if node is self.root:
                prior = (1 - cfg.root_prior_mix) * prior + cfg.root_prior_mix / (len(node.children) + 1)
            node.children.append(Node(tokens=tokens, depth=node.depth + 1, prior=prior, raw_prob=p,
                                      parent=node, dynamic=True))
            self.stats.nodes += 1
            self.stats.dynamic_additions += 1

    # ------------------------------------------------------------------ helpers
    def _mix(self, priors: np.ndarray) -> np.ndarray:
        mix = self.cfg.root_prior_mix
        mixed: np.ndarray = (1 - mix) * priors + mix / len(priors)
        return mixed / float(mixed.sum())

    def _mix_root_priors(self, priors: list[float], children: list[Node]) -> None:
        if not children:
            return
        for c, p in zip(children, self._mix(np.array(priors, dtype=np.float64))):
            c.prior = float(p)

    def status(self, done: int, budget: int, visits_before: int) -> SearchStatus:
        return SearchStatus(step=self.stats.steps + 1, iteration=done, budget=budget, visits_before=visits_before,
                            t_max=self.cfg.t_max, fresh=self.cfg.fresh_iterations, nodes=self.stats.nodes,
                            answer_tokens=len(self.answer))

    def tree_dict(self, node: Node) -> dict[str, Any]:
        """The subtree under `node` as plain data (for --trace)."""
        return {
            "tokens": list(node.tokens),
            "text": self.env.decode(node.tokens),
            "visits": node.visits,
            "n": round(node.n, 6),
            "value": round(node.q, 6),
            "prior": round(node.prior, 6),
            "similarity_updates": node.similarity_updates,
            "dynamic": node.dynamic,
            "children": [self.tree_dict(c) for c in node.children],
        }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else 0.0
