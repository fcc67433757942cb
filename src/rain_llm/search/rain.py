"""The RAIN search: a tree of token sets, PUCT selection, self-evaluation and rewind.

Pure Python and numpy. Everything that touches a model sits behind `SearchEnv`, a handful of
small functions (as in DeepMind's mctx), so the search can be read, traced and tested alone.

One inner-loop iteration (`RainSearch.iterate`):
  1. select   from the root down by argmax q_hat + u (adding candidates where siblings are all
              alike and bad: dynamic node addition);
  2. expand   the leaf with k candidate token sets (unless the answer has ended), and continue
              it to the next punctuation mark (rollout; the engine may batch both);
  3. evaluate the leaf plus rollout by self-evaluation;
  4. rewind   back the value up the path, and to siblings with similar sentence embeddings.
The outer loop (`RainSearch.run`) commits the most-visited child of the root once it is
good enough, keeps its subtree, and repeats until the answer ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rain_llm.config import RainConfig, token_set_length

Tokens = tuple[int, ...]
Job = tuple[Tokens, int, int, int]  # expand: (answer, token-set length, candidates, sample attempts)
Request = tuple[str, list]  # ("expand", [Job, ...]), ("value", [answer, ...]) or ("embed", [span, ...])


class SearchEnv(Protocol):
    """What the search needs from a model. Token ids only: no tensors cross this line."""

    def propose(self, answer: Tokens, length: int, n: int, attempts: int) -> list[tuple[Tokens, float]]:
        """Candidate token sets to follow `answer`, with their sequence probabilities.

        length 1: the n most likely tokens; longer: the greedy set plus up to `attempts`
        sampled sets, duplicates dropped, at most n in all. Sets may be shorter than
        `length` where they end the answer (end of turn, budget)."""

    def expand(self, answer: Tokens, length: int, n: int, attempts: int) -> tuple[list[tuple[Tokens, float]], Tokens]:
        """`propose(answer, length, n, attempts)` and `rollout(answer)` together (a backend
        may run them as one batch)."""

    def rollout(self, answer: Tokens) -> Tokens:
        """Tokens sampled after `answer` up to the next punctuation mark or end of turn."""

    def value(self, answer: Tokens) -> float:
        """Self-evaluation of the answer text in [-1, 1] (higher is better)."""

    def embed(self, spans: Sequence[Tokens]) -> np.ndarray:
        """One sentence embedding per token span (rows)."""

    def is_terminal(self, answer: Tokens) -> bool:
        """Whether `answer` is finished (end of turn, token budget, new user turn)."""

    def decode(self, tokens: Tokens) -> str:
        """Text of a token span (for traces)."""

    def on_commit(self, answer: Tokens) -> None:
        """The answer so far is now fixed; anything not extending it may be freed."""

    def over_budget(self) -> bool:
        """Whether this answer's compute budget (tokens processed or seconds) is spent."""

    def complete(self, answer: Tokens) -> Tokens:
        """Finish the answer by plain decoding (used once the budget is spent)."""


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
    terminal_evaluations: int = 0
    budget_stopped: bool = False  # the compute budget ran out: best path committed, the rest decoded plainly
    completed_tokens: int = 0  # tokens decoded without search after the budget ran out


@dataclass
class SearchResult:
    tokens: Tokens
    stats: SearchStats
    steps: list[StepRecord]
    seconds: float


ProgressFn = Callable[[dict[str, Any]], None]


class RainSearch:
    """One RAIN search over one prompt. Create, then `run()`."""

    def __init__(self, env: SearchEnv, config: RainConfig, *, trace: bool = False,
                 progress: ProgressFn | None = None):
        self.env = env
        self.cfg = config
        self.trace = trace
        self.progress = progress
        self.root = Node(tokens=(), depth=0)
        self.answer: Tokens = ()  # committed tokens
        self.q_min = config.q_min_init
        self.q_max = config.q_max_init
        self.stats = SearchStats(nodes=1)

    # ------------------------------------------------------------------ outer loop
    def run(self) -> SearchResult:
        return _drive(self, self.steps())

    def steps(self) -> Generator[Request, Any, SearchResult]:
        """The search as a generator of model requests ("expand", jobs), ("value", answers) and
        ("embed", spans):
        `run` answers them one search at a time, `run_lockstep` batches them across searches."""
        start = time.perf_counter()
        steps: list[StepRecord] = []
        while not self.env.is_terminal(self.answer):
            if self.env.over_budget():
                self._finish_over_budget(steps)
                break
            visits_before = self.root.visits
            end = max(self.cfg.t_max, visits_before + self.cfg.fresh_iterations)
            done = 0
            while visits_before + done < end:
                if done > 0 and self.env.over_budget():
                    break
                done += yield from self.round(max_leaves=end - visits_before - done)
                self._report(done, end - visits_before)
                best = self.best_child(self.root)
                if best is not None and best.visits > self.cfg.t_min and best.q > self.cfg.value_threshold:
                    break
            best = self.best_child(self.root)
            if best is None:  # only possible if the root could not be expanded at all
                break
            self._commit_step(steps, best, done, visits_before)
        return SearchResult(self.answer, self.stats, steps, time.perf_counter() - start)

    def _commit_step(self, steps: list[StepRecord], best: Node, iterations: int, visits_before: int) -> None:
        steps.append(StepRecord(iterations=iterations, committed=best.tokens, visits_before=visits_before,
                                tree=self.tree_dict(self.root) if self.trace else None))
        self.stats.steps += 1
        self.stats.iterations_per_step.append(iterations)
        self.commit(best)

    def _finish_over_budget(self, steps: list[StepRecord]) -> None:
        """The compute budget is spent: commit the best path found so far, then let the model finish
        the answer by plain decoding (no more search)."""
        self.stats.budget_stopped = True
        while not self.env.is_terminal(self.answer) and (best := self.best_child(self.root)) is not None:
            self._commit_step(steps, best, 0, self.root.visits)
        if not self.env.is_terminal(self.answer):
            rest = self.env.complete(self.answer)
            self.answer = self.answer + rest
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
        self.env.on_commit(self.answer)

    # ------------------------------------------------------------------ inner loop
    def iterate(self, max_leaves: int | None = None) -> int:
        """One round (see `round`), its model requests answered by this search's env."""
        return _drive(self, self.round(max_leaves))

    def round(self, max_leaves: int | None = None) -> Generator[Request, Any, int]:
        """One round: select P leaves (P = parallel_leaves; virtual loss keeps them apart), expand
        them with their rollouts, evaluate, rewind each. P = 1 is the paper's sequential loop:
        select -> expand (with the rollout) -> evaluate -> rewind. Returns the leaves done."""
        leaves: list[tuple[Node, Tokens]] = []
        for _ in range(min(self.cfg.parallel_leaves, max_leaves or self.cfg.parallel_leaves)):
            node, answer = self._descend()
            if any(node is other for other, _ in leaves):
                break  # virtual loss could not push the selection elsewhere: the tree is too small
            leaves.append((node, answer))
            self._pending(node, +1)
        for node, _ in leaves:
            self._pending(node, -1)
        open_leaves = [(node, answer) for node, answer in leaves if not self.env.is_terminal(answer)]
        jobs = [(answer, token_set_length(self.cfg, node.depth), self.cfg.num_candidates, self.cfg.sample_attempts)
                for node, answer in open_leaves]
        results = (yield ("expand", jobs)) if jobs else []
        expanded = dict(zip((id(n) for n, _ in open_leaves), results))
        rollouts = [expanded[id(node)][1] if id(node) in expanded else () for node, _ in leaves]
        values = yield ("value", [answer + r for (_, answer), r in zip(leaves, rollouts)])
        spans = [self._spans(node, rollout) for (node, _), rollout in zip(leaves, rollouts)]
        flat = [span for leaf_spans in spans for span in leaf_spans]
        embedded = (yield ("embed", flat)) if flat else np.zeros((0, 0))
        start = 0
        for (node, _), rollout, value, leaf_spans in zip(leaves, rollouts, values, spans):
            if id(node) in expanded:  # evaluated the leaf (official: before expanding it)
                self.add_children(node, expanded[id(node)][0])
            else:
                self.stats.terminal_evaluations += 1
            self.backup(node, value, rollout, embedded[start:start + len(leaf_spans)])
            start += len(leaf_spans)
        return len(leaves)

    def _descend(self) -> tuple[Node, Tokens]:
        node, answer = self.root, self.answer
        while node.children:
            self._maybe_add_children(node, answer)
            node = self.select(node)
            answer = answer + node.tokens
        return node, answer

    def _pending(self, leaf: Node, delta: int) -> None:
        """Virtual loss: a leaf chosen in this round counts, until backed up, as a visit worth -1."""
        node: Node | None = leaf
        while node is not None:
            node.pending += delta
            node = node.parent

    def _expand_all(self, jobs: list[Job]) -> list[tuple[list[tuple[Tokens, float]], Tokens]]:
        batch = getattr(self.env, "expand_batch", None)
        if batch is not None and len(jobs) > 1:
            return batch(jobs)
        return [self.env.expand(*job) for job in jobs]

    def _value_all(self, answers: list[Tokens]) -> list[float]:
        batch = getattr(self.env, "value_batch", None)
        if batch is not None and len(answers) > 1:
            return batch(answers)
        return [self.env.value(a) for a in answers]

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

    def add_children(self, node: Node, candidates: list[tuple[Tokens, float]]) -> None:
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

    def backup(self, leaf: Node, value: float, rollout: Tokens, embeddings: np.ndarray | None = None) -> None:
        """Rewind: update the path (running mean) and similar siblings (official nodes.backup).
        `embeddings`: of `_spans(leaf, rollout)`, when the caller embedded them (batched)."""
        path = leaf.path()
        if embeddings is None:
            spans = self._spans(leaf, rollout)
            embeddings = self.env.embed(spans) if spans else np.zeros((0, 0))
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

    def _maybe_add_children(self, node: Node, answer: Tokens) -> None:
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
            proposals = self.env.propose(answer, 1, len(node.children) + 1, 0)
        else:  # the greedy set plus fresh samples
            proposals = self.env.propose(answer, length, cfg.dynamic_extra_samples,
                                         cfg.dynamic_extra_samples - 1)
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
        mixed = (1 - mix) * priors + mix / len(priors)
        return mixed / mixed.sum()

    def _mix_root_priors(self, priors: list[float], children: list[Node]) -> None:
        if not children:
            return
        for c, p in zip(children, self._mix(np.array(priors, dtype=np.float64))):
            c.prior = float(p)

    def _report(self, done: int, budget: int) -> None:
        if self.progress is not None:
            self.progress({"step": self.stats.steps + 1, "iteration": done, "budget": budget,
                           "nodes": self.stats.nodes, "answer_tokens": len(self.answer)})

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


def _drive(search: RainSearch, gen: Generator[Request, Any, Any]) -> Any:
    """Answer a generator's requests with its own env (one search, no batching across searches)."""
    reply: Any = None
    while True:
        try:
            kind, payload = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        reply = _drive_one(search, kind, payload)


ExpandMany = Callable[[list[tuple[Any, list[Job]]]], list[list[tuple[list[tuple[Tokens, float]], Tokens]]]]
ValueMany = Callable[[list[tuple[Any, list[Tokens]]]], list[list[float]]]
EmbedMany = Callable[[list[tuple[Any, list[Tokens]]]], list[np.ndarray]]


class ExpandStream(Protocol):
    """Expansions decoded token by token beside other searches' (`rain_llm.env.ExpandStream`)."""

    def __len__(self) -> int: ...

    def start(self, key: Hashable, env: Any, jobs: list[Job]) -> None: ...

    def step(self) -> dict[Hashable, list[tuple[list[tuple[Tokens, float]], Tokens]]]: ...

    def cancel(self, key: Hashable) -> None: ...


def run_lockstep(searches: Sequence[RainSearch], expand_many: ExpandMany | None = None,
                 value_many: ValueMany | None = None, embed_many: EmbedMany | None = None,
                 expand_stream: ExpandStream | None = None) -> list[SearchResult]:
    """Run several searches at once (see `Lockstep`): their model calls are batched across
    prompts by the batch functions; a search that finishes leaves, the others go on. Without the
    batch functions each env answers its own requests (same results as `run`)."""
    lockstep = Lockstep(expand_many, value_many, embed_many, expand_stream)
    results: dict[Hashable, SearchResult] = {}
    for i, search in enumerate(searches):
        if (done := lockstep.add(i, search)) is not None:
            results[i] = done
    while lockstep:
        results.update(lockstep.round())
    return [results[i] for i in range(len(searches))]


class Lockstep:
    """Searches that run side by side and may join or leave at any `round` (continuous
    batching): `add` starts one, `round` answers pending requests, one batched call per kind,
    and returns the searches that finished.

    Without an `expand_stream` a round is one search iteration for every search: all expansions
    as one decode batch, then all evaluations, then all embeddings; the round lasts as long as
    its longest row. With one, a round is one token: expansions decode in the stream and a search
    whose rows are done moves on while others still decode, so a round costs one forward for the
    expansions, plus one for evaluations when enough searches wait for one (half of them, or
    any that waited `VALUE_WAIT` rounds, or nothing else decoding) and one embedding call."""

    VALUE_WAIT = 4  # rounds an evaluation may wait for company (one forward serves all waiting)
    VALUE_SHARE = 0.5  # ... unless this share of the searches is waiting

    def __init__(self, expand_many: ExpandMany | None = None, value_many: ValueMany | None = None,
                 embed_many: EmbedMany | None = None, expand_stream: ExpandStream | None = None):
        self.batch_fns = (("expand", expand_many), ("value", value_many), ("embed", embed_many))
        self.expand_stream = expand_stream
        self.searches: dict[Hashable, RainSearch] = {}
        self.gens: dict[Hashable, Generator[Request, Any, SearchResult]] = {}
        self.pending: dict[Hashable, Request] = {}
        self.decoding: set[Hashable] = set()  # searches whose expansion is in the stream
        self.waited: dict[Hashable, int] = {}  # rounds a pending evaluation has waited

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, key: Hashable, search: RainSearch) -> SearchResult | None:
        """Start a search; its result at once if it needed no model call (else None)."""
        if key in self.searches:
            raise ValueError(f"search {key!r} is already running")
        self.searches[key], self.gens[key] = search, search.steps()
        return self._advance(key, None)

    def round(self) -> dict[Hashable, SearchResult]:
        if self.expand_stream is None:
            finished: dict[Hashable, SearchResult] = {}
            for kind, _ in self.batch_fns:
                finished.update(self._answer(kind, [k for k, (kk, _) in self.pending.items() if kk == kind]))
            return finished
        return self._token_round()

    def _token_round(self) -> dict[Hashable, SearchResult]:
        stream, finished = self.expand_stream, {}
        for key, (kind, jobs) in self.pending.items():
            if kind == "expand" and key not in self.decoding:
                stream.start(key, self.searches[key].env, jobs)
                self.decoding.add(key)
        for key, reply in stream.step().items():
            self.decoding.discard(key)
            if (done := self._advance(key, reply)) is not None:
                finished[key] = done
        waiting = [k for k, (kind, _) in self.pending.items() if kind == "value"]
        for key in waiting:
            self.waited[key] = self.waited.get(key, 0) + 1
        if waiting and (not len(stream) or len(waiting) >= self.VALUE_SHARE * len(self.pending)
                        or max(self.waited[k] for k in waiting) >= self.VALUE_WAIT):
            for key in waiting:
                del self.waited[key]
            finished.update(self._answer("value", waiting))
        finished.update(self._answer("embed", [k for k, (kind, _) in self.pending.items() if kind == "embed"]))
        return finished

    def _answer(self, kind: str, keys: list[Hashable]) -> dict[Hashable, SearchResult]:
        """Answer these searches' pending requests of one kind (one batched call); advance them."""
        finished: dict[Hashable, SearchResult] = {}
        if not keys:
            return finished
        many = dict(self.batch_fns)[kind]
        if many is not None:
            replies = many([(self.searches[k].env, self.pending[k][1]) for k in keys])
        else:
            replies = [_drive_one(self.searches[k], kind, self.pending[k][1]) for k in keys]
        for k, reply in zip(keys, replies):
            if (done := self._advance(k, reply)) is not None:
                finished[k] = done
        return finished

    def remove(self, key: Hashable) -> None:
        """Stop a search before it finishes (its client went away)."""
        self.pending.pop(key, None)
        self.waited.pop(key, None)
        if key in self.decoding:
            self.decoding.discard(key)
            self.expand_stream.cancel(key)
        gen = self.gens.pop(key, None)
        if gen is not None:
            gen.close()
        self.searches.pop(key, None)

    def _advance(self, key: Hashable, reply: Any) -> SearchResult | None:
        try:
            self.pending[key] = self.gens[key].send(reply)
            return None
        except StopIteration as stop:
            self.pending.pop(key, None)
            del self.gens[key], self.searches[key]
            return stop.value


def _drive_one(search: RainSearch, kind: str, payload: list) -> Any:
    if kind == "embed":
        return search.env.embed(payload)
    return search._expand_all(payload) if kind == "expand" else search._value_all(payload)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else 0.0
