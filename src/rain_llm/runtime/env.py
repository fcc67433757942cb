"""`ModelEnv`: the search's view of one prompt on one engine (the `SearchEnv` functions).

Turns token-level requests of the search into engine calls, in phases that the engine counts:
expand (candidate token sets), simulate (rollout to the next punctuation mark), evaluate
(self-evaluation), embed (sentence embeddings for similarity updates).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from rain_llm.config import RainConfig
from rain_llm.engine.base import Counters, Engine, PhaseCount, Row, Sample, split
from rain_llm.runtime.prompts import PromptFormat
from rain_llm.search.rain import Tokens
from rain_llm.values.embedder import MiniLMEmbedder
from rain_llm.values.sources import Evaluator


class ModelEnv:
    """`owner`: this answer's own counters, when several answers share the engine (lockstep);
    the engine's counters then hold the whole batch's work."""

    def __init__(self, engine: Engine, evaluator: Evaluator, embedder: MiniLMEmbedder,
                 context: list[int], fmt: PromptFormat, config: RainConfig, owner: Counters | None = None):
        self.engine = engine
        self.evaluator = evaluator
        self.embedder = embedder
        self.context = context
        self.fmt = fmt
        self.cfg = config
        self.owner = owner
        self.values: dict[Tokens, float] = {}  # official: values cached by text (dic)
        # this answer's own random stream: its samples do not depend on which answers share a batch
        self.rng = np.random.default_rng(config.seed)
        self.started = time.perf_counter()
        self.value_cache_hits = 0
        self.eval_engine = getattr(evaluator, "engine", None)  # None: the value needs no model of ours
        with self.phase("prefill"):  # the prompt and the evaluation prompt, once
            engine.next_logits(context)
            for ids in evaluator.retain("") if self.eval_engine is not None else []:
                self.eval_engine.next_logits(ids)
        self.on_commit((), prune=False)  # claim this prompt's entries among answers sharing the engine

    @contextmanager
    def phase(self, name: str, *engines: Any) -> Iterator[None]:
        """Count work under `name` in the engines' counters and, in a batch of answers, charge
        it to this answer too."""
        engines = engines or tuple({id(e): e for e in (self.engine, self.eval_engine) if e is not None}.values())
        with ExitStack() as stack:
            for engine in engines:
                stack.enter_context(engine.counters.phase(name))
            if self.owner is not None:
                stack.enter_context(self.owner.phase(name))
                for engine in engines:
                    stack.callback(setattr, engine, "charge_to", getattr(engine, "charge_to", None))
                    engine.charge_to = self.owner
            yield

    def text(self, answer: Sequence[int]) -> str:
        return self.fmt.clean(self.engine.decode(answer))

    # ------------------------------------------------------------------ SearchEnv
    def expand(self, answer: Tokens, length: int, n: int, attempts: int) -> tuple[list[tuple[Tokens, float]], Tokens]:
        """Candidates and the rollout in one batch: the rollout is one more row of the
        expansion's decode, with its own sampling rule (full distribution) and stop rule."""
        length = self._clip(answer, length)
        rollout_row = self._rollout_row(answer)
        if length == 1 or rollout_row is None:
            candidates = self.propose(answer, length, n, attempts)
            return candidates, self.rollout(answer) if rollout_row is not None else ()
        rows = self._candidate_rows(length, attempts) + [rollout_row]
        with self.phase("expand"):
            samples = self.engine.decode_rows(self.context + list(answer), rows, self.uniforms(rows))
        return self._candidates(samples[:-1], n), tuple(samples[-1].tokens)

    def propose(self, answer: Tokens, length: int, n: int, attempts: int) -> list[tuple[Tokens, float]]:
        cfg = self.cfg
        length = self._clip(answer, length)
        ctx = self.context + list(answer)
        with self.phase("expand"):
            if length == 1:  # official: the top-k tokens with their probabilities (no sampling)
                logits = self.engine.next_logits(ctx).astype(np.float64) / cfg.temperature
                top = np.argsort(-logits, kind="stable")[:n]
                p = np.exp(logits[top] - logits[top].max())
                p /= p.sum()
                return [((int(t),), float(pt)) for t, pt in zip(top, p)]
            rows = self._candidate_rows(length, attempts)
            samples = self.engine.decode_rows(ctx, rows, self.uniforms(rows))
        return self._candidates(samples, n)

    def _candidate_rows(self, length: int, attempts: int) -> list[Row]:
        """The greedy token set, then `attempts` sampled ones (temperature, top-k)."""
        cfg = self.cfg
        return [Row(length, cfg.temperature, cfg.top_k, greedy=i == 0) for i in range(1 + attempts)]

    def uniforms(self, rows: Sequence[Row]) -> np.ndarray:
        """Uniforms for the rows' inverse-CDF sampling, from this answer's stream."""
        return self.rng.random((len(rows), max(r.max_tokens for r in rows)))

    def _clip(self, answer: Tokens, length: int) -> int:
        return max(1, min(length, self.cfg.max_new_tokens - len(answer)))

    @staticmethod
    def _candidates(samples: list[Sample], n: int) -> list[tuple[Tokens, float]]:
        """Greedy first, then distinct samples (official group_getp)."""
        greedy = samples[0]
        seen = {tuple(greedy.tokens)}
        others: list[tuple[Tokens, float]] = []
        for s in samples[1:]:
            t = tuple(s.tokens)
            if t not in seen and len(others) < n - 1:
                seen.add(t)
                others.append((t, float(np.exp(s.logprob))))
        gp = float(np.exp(greedy.logprob))
        if others:  # official: keep the greedy prior between max + min and the sum of the others
            ps = np.array([p for _, p in others])
            gp = max(min(gp, float(ps.sum())), float(ps.max() + ps.min()))
        return [(tuple(greedy.tokens), gp)] + others

    def _rollout_row(self, answer: Tokens) -> Row | None:
        """The simulation's decode rule, or None where the answer already ends a clause."""
        if self._ends_clause(self.engine.decode(answer)):
            return None
        tail = list(answer[-8:])
        return Row(self.cfg.max_rollout_tokens, self.cfg.rollout_temperature, 0,
                   done=lambda tokens: self._ends_clause(self.engine.decode(tail + tokens)))

    def rollout(self, answer: Tokens) -> Tokens:
        row = self._rollout_row(answer)
        if row is None:
            return ()
        with self.phase("simulate"):
            return tuple(self.engine.decode_rows(self.context + list(answer), [row], self.uniforms([row]))[0].tokens)

    def _ends_clause(self, text: str) -> bool:
        return (bool(text) and text[-1] in self.cfg.rollout_stop_chars) or self.fmt.ended(text)

    def value(self, answer: Tokens) -> float:
        if answer in self.values:
            self.value_cache_hits += 1
            return self.values[answer]
        with self.phase("evaluate"):
            v = self.evaluator.value(self.text(answer))
        self.values[answer] = v
        return v

    def embed(self, spans: Sequence[Tokens]) -> np.ndarray:
        return embed_many([(self, list(spans))])[0]

    def is_terminal(self, answer: Tokens) -> bool:
        if len(answer) >= self.cfg.max_new_tokens:
            return True
        if answer and answer[-1] in self.engine.stop_ids:
            return True
        return self.fmt.ended(self.engine.decode(answer[-16:]))

    def decode(self, tokens: Tokens) -> str:
        return self.engine.decode(tokens)

    def over_budget(self) -> bool:
        cfg = self.cfg
        spent = (self.owner or self.engine.counters).total().tokens  # this answer's work, also in a batch
        if cfg.max_search_tokens and spent >= cfg.max_search_tokens:
            return True
        return bool(cfg.max_search_seconds) and time.perf_counter() - self.started >= cfg.max_search_seconds

    def complete(self, answer: Tokens) -> Tokens:
        with self.phase("generate", self.engine):
            return tuple(self.engine.generate(self.context + list(answer), self.cfg.max_new_tokens - len(answer)))

    def on_commit(self, answer: Tokens, prune: bool = True) -> None:
        """Free cached KV that no longer extends the committed answer (bounded memory). With
        prune=False only register what this answer keeps (other answers may not be set up yet)."""
        keep = self.evaluator.retain(self.text(answer))
        if self.eval_engine is self.engine:
            wanted = {self.engine: [self.context + list(answer), *keep]}
        else:
            wanted = {self.engine: [self.context + list(answer)]}
            if self.eval_engine is not None:
                wanted[self.eval_engine] = keep
        for engine, prefixes in wanted.items():
            if prune:
                engine.retain(prefixes, owner=self)
            else:
                engine.claim(prefixes, owner=self)

    def close(self) -> None:
        """The answer is done: its cache entries may go once another answer commits."""
        for engine in {id(e): e for e in (self.engine, self.eval_engine) if e is not None}.values():
            engine.release(self)

    # ------------------------------------------------------------------ batches of leaves / answers
    def expand_batch(self, jobs: list[tuple[Tokens, int, int, int]]) -> list[tuple[list[tuple[Tokens, float]], Tokens]]:
        return expand_many([(self, jobs)])[0]

    def value_batch(self, answers: list[Tokens]) -> list[float]:
        return value_many([(self, answers)])[0]


Job = tuple[Tokens, int, int, int]  # (answer, token-set length, n candidates, sample attempts)


def _job_rows(env: ModelEnv, job: Job) -> tuple[tuple[int, int, bool], list[Row]]:
    """A leaf's decode rows (its candidates unless the token set is one token long, then its
    rollout) and the plan to read them back: (token-set length, rows, has a rollout)."""
    answer, length, _, attempts = job
    length = env._clip(answer, length)
    rows = env._candidate_rows(length, attempts) if length > 1 else []
    rollout_row = env._rollout_row(answer)
    if rollout_row is not None:
        rows.append(rollout_row)
    return (length, len(rows), rollout_row is not None), rows


def _job_result(env: ModelEnv, job: Job, plan: tuple[int, int, bool],
                samples: Sequence[Sample]) -> tuple[list[tuple[Tokens, float]], Tokens]:
    """A leaf's candidates and rollout from its decoded rows."""
    answer, _, n, attempts = job
    length, _, has_rollout = plan
    rollout = tuple(samples[-1].tokens) if has_rollout else ()
    if length > 1:
        return env._candidates(list(samples[:len(samples) - int(has_rollout)]), n), rollout
    return env.propose(answer, 1, n, attempts), rollout  # top-k of the cached next-token logits


def expand_many(items: list[tuple[ModelEnv, list[Job]]]) -> list[list[tuple[list[tuple[Tokens, float]], Tokens]]]:
    """Expand many leaves (of one search or of several sharing an engine) as one decode batch:
    each leaf's candidate rows and its rollout row. Results in the order of `items` and jobs."""
    if len({id(env.engine) for env, _ in items}) > 1:  # different models cannot share a batch
        return [[env.expand(*job) for job in jobs] for env, jobs in items]
    requests, owners, plans = [], [], []
    for env, jobs in items:
        for job in jobs:
            plan, rows = _job_rows(env, job)
            plans.append(plan)
            if rows:
                requests.append((env.context + list(job[0]), rows, env.uniforms(rows)))
                owners.append(env.owner)
    engine = items[0][0].engine
    samples: list = []
    if requests:
        with _batch_phase([env for env, _ in items], engine, "expand"):
            samples = engine.decode_groups(requests, owners if any(o is not None for o in owners) else None)
    it, plan_it = iter(samples), iter(plans)
    return [[_job_result(env, job, plan, next(it) if plan[1] else [])
             for job, plan in zip(jobs, plan_it)] for env, jobs in items]


_PLAIN = object()  # marks a plain decode in the stream (a vanilla answer, not a leaf of a search)


class ExpandStream:
    """Expansions that decode token by token beside other searches' (the engine's `DecodeStream`):
    `start` a search's leaves, `step` runs one forward for every row in flight and returns the
    searches whose leaves are all done. A search no longer waits for the longest row of the
    batch, only for its own (see `Lockstep`). Plain decodes (vanilla answers) may share the
    stream: `start_plain`, and `take_plain` after a step."""

    def __init__(self) -> None:
        self.streams: dict[int, Any] = {}  # per engine
        self.started: dict[Hashable, tuple[ModelEnv, list[Job], list[tuple[int, int, bool]]]] = {}
        self.samples: dict[Hashable, dict[int, Sequence[Sample]]] = {}
        self.plain: dict[Hashable, tuple[Engine, Counters]] = {}  # plain decodes in flight: engine, owner
        self.plain_done: dict[Hashable, Sample] = {}

    def __len__(self) -> int:
        return len(self.started)

    def _stream(self, engine: Engine) -> Any:
        stream = self.streams.get(id(engine))
        if stream is None:
            stream = self.streams[id(engine)] = engine.stream()
        return stream

    def start_plain(self, key: Hashable, engine: Engine, context: list[int], row: Row, owner: Counters) -> None:
        """Decode one row after `context` in the stream, charged to `owner` under "generate"."""
        self._stream(engine).join((_PLAIN, key), context, [row], None, owner)
        self.plain[key] = (engine, owner)

    def take_plain(self) -> dict[Hashable, Sample]:
        """The plain decodes finished since the last call."""
        done, self.plain_done = self.plain_done, {}
        return done

    def cancel_plain(self, key: Hashable) -> None:
        if (found := self.plain.pop(key, None)) is not None:
            self.streams[id(found[0])].cancel((_PLAIN, key))

    def start(self, key: Hashable, env: ModelEnv, jobs: list[Job]) -> None:
        stream = self._stream(env.engine)
        plans = []
        for j, job in enumerate(jobs):
            plan, rows = _job_rows(env, job)
            plans.append(plan)
            if rows:
                uniforms = env.uniforms(rows)
            else:  # one greedy token: the leaf's logits get computed and cached for `propose`
                rows, uniforms = [Row(1, 1.0, 0, greedy=True)], np.full((1, 1), 0.5)
            stream.join((key, j), env.context + list(job[0]), rows, uniforms, env.owner)
        self.started[key] = (env, jobs, plans)
        self.samples[key] = {}

    def cancel(self, key: Hashable) -> None:
        started = self.started.pop(key, None)
        self.samples.pop(key, None)
        if started is not None:
            stream = self.streams[id(started[0].engine)]
            for j in range(len(started[1])):
                stream.cancel((key, j))

    def step(self) -> dict[Hashable, list[tuple[list[tuple[Tokens, float]], Tokens]]]:
        out = {}
        for stream in self.streams.values():
            if not stream:
                continue
            envs = [self.started[key][0] for key in {key for key, _ in stream.requests if key is not _PLAIN}]
            # the engine counts the step as expansion work, or as generation if only plain decodes ran
            with _batch_phase(envs, stream.engine, "expand" if envs else "generate"), ExitStack() as plain:
                for key, j in stream.requests:
                    if key is _PLAIN:
                        plain.enter_context(self.plain[j][1].phase("generate"))
                done = stream.step()
            for (key, j), samples in done.items():
                if key is _PLAIN:
                    del self.plain[j]
                    self.plain_done[j] = samples[0]
                else:
                    self.samples[key][j] = samples
        for key in [k for k, (_, jobs, _) in self.started.items() if len(self.samples[k]) == len(jobs)]:
            env, jobs, plans = self.started.pop(key)
            samples = self.samples.pop(key)
            with env.phase("expand"):
                out[key] = [_job_result(env, job, plan, samples[j]) for j, (job, plan) in enumerate(zip(jobs, plans))]
        return out


def embed_many(items: list[tuple[ModelEnv, list[Tokens]]]) -> list[np.ndarray]:
    """Sentence embeddings of many spans (of several searches sharing an embedder) as one batch;
    each answer is charged its rows of the padded batch."""
    embedder = items[0][0].embedder
    if any(env.embedder is not embedder for env, _ in items):
        return [env.embed(spans) for env, spans in items]
    texts = [env.engine.decode(span) for env, spans in items for span in spans]
    counters = embedder.counters
    before = counters.phases.get("embed")
    tokens_before = before.tokens if before else 0
    with _batch_phase([env for env, _ in items], embedder, "embed"):
        vectors = embedder.embed(texts)
    width = (counters.phases["embed"].tokens - tokens_before) // max(len(texts), 1)
    for env, spans in items:
        if env.owner is not None and spans:
            mine = env.owner.phases.setdefault("embed", PhaseCount())
            mine.forward_passes += 1
            mine.tokens += len(spans) * width
    return split(vectors, [len(spans) for _, spans in items])


@contextmanager
def _batch_phase(envs: list[ModelEnv], engine: Any, name: str) -> Iterator[None]:
    """One batched call: the engine counts it once; each answer's own counters see its duration
    (its rows' work is charged to it by the engine)."""
    with ExitStack() as stack:
        stack.enter_context(engine.counters.phase(name))
        for owner in {id(e.owner): e.owner for e in envs if e.owner is not None}.values():
            stack.enter_context(owner.phase(name))
        yield


def value_many(items: list[tuple[ModelEnv, list[Tokens]]]) -> list[list[float]]:
    """Values of many answers (of one search or several) with one scoring batch per evaluation
    engine; cached values and evaluators without a batch form are computed as usual."""
    out = [[0.0] * len(answers) for _, answers in items]
    batches: dict[int, list[tuple[int, int, ModelEnv, Tokens, tuple]]] = {}
    for i, (env, answers) in enumerate(items):
        request = getattr(env.evaluator, "request", None)
        for j, answer in enumerate(answers):
            if answer in env.values:
                env.value_cache_hits += 1
                out[i][j] = env.values[answer]
            elif request is None or env.eval_engine is None:
                out[i][j] = env.value(answer)
            else:
                batches.setdefault(id(env.eval_engine), []).append((i, j, env, answer, request(env.text(answer))))
    for batch in batches.values():
        engine = batch[0][2].eval_engine
        unique: dict[tuple[int, Tokens], int] = {}  # the same answer twice in a round: score it once
        requests, owners = [], []
        for _, _, env, answer, req in batch:
            if (id(env), answer) not in unique:
                unique[(id(env), answer)] = len(requests)
                requests.append(req)
                owners.append(env.owner)
        with _batch_phase([env for _, _, env, _, _ in batch], engine, "evaluate"):
            probs = engine.score_many(requests, owners if any(o is not None for o in owners) else None)
        for i, j, env, answer, _ in batch:
            v = env.evaluator.value_from(probs[unique[(id(env), answer)]])
            env.values[answer] = v
            out[i][j] = v
    return out
