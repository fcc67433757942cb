"""The search alone, on a scripted fake environment: exact arithmetic of the paper's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rain_llm.config import RainConfig
from rain_llm.search import (
    Checkpoint,
    Commit,
    Complete,
    EmbedSpans,
    Expand,
    Expansion,
    Node,
    Propose,
    RainSearch,
    Value,
)

EOS = 0


class FakeEnv:
    """Token sets are runs of one token id; values and embeddings are scripted by the caller."""

    def __init__(self, probs=(0.5, 0.3, 0.2), value=None, embed=None, budget=6, rollout=(), seed=None):
        self.probs = probs
        self.value_fn = value or (lambda answer: 0.0)
        self.embed_fn = embed or (lambda span: np.eye(8)[span[0] % 8])
        self.budget = budget
        self.rollout_tokens = tuple(rollout)
        self.rng = np.random.default_rng(seed) if seed is not None else None
        self.calls: list[tuple] = []
        self.commits: list[tuple] = []
        self.checkpoints: list = []

    def expand(self, answer, length, n, attempts):
        self.calls.append(("expand", answer, length, n, attempts))
        return self._candidates(length, n), self.rollout_tokens

    def propose(self, answer, length, n, attempts):
        self.calls.append(("propose", answer, length, n, attempts))
        return self._candidates(length, n)

    def _candidates(self, length, n):
        probs = self.probs
        if self.rng is not None:
            probs = tuple(self.rng.dirichlet(np.ones(len(self.probs))))
        return [((i + 1,) * length, p) for i, p in enumerate(probs[:n])]

    def rollout(self, answer):
        self.calls.append(("rollout", answer))
        return self.rollout_tokens

    def value(self, answer):
        self.calls.append(("value", answer))
        return float(self.value_fn(answer))

    def embed(self, spans):
        return np.stack([self.embed_fn(s) for s in spans])

    def is_terminal(self, answer):
        return len(answer) >= self.budget or (len(answer) > 0 and answer[-1] == EOS)

    def decode(self, tokens):
        return " ".join(map(str, tokens))

    eval_budget = None  # over budget after this many evaluations

    def over_budget(self):
        return self.eval_budget is not None and sum(c[0] == "value" for c in self.calls) >= self.eval_budget

    def complete(self, answer):
        self.calls.append(("complete", answer))
        return (7,) * (self.budget_total - len(answer))


def reply(env: FakeEnv, request):
    """What the fake env answers to one of the search's requests."""
    if isinstance(request, Expand):
        return [Expansion(*env.expand(j.answer, j.length, j.candidates, j.attempts)) for j in request.jobs]
    if isinstance(request, Propose):
        j = request.job
        return env.propose(j.answer, j.length, j.candidates, j.attempts)
    if isinstance(request, Value):
        return [env.value(a) for a in request.answers]
    if isinstance(request, EmbedSpans):
        return env.embed(request.spans)
    if isinstance(request, Commit):
        env.commits.append(request.answer)
        return None
    if isinstance(request, Checkpoint):
        env.checkpoints.append(request.status)
        return env.over_budget()
    assert isinstance(request, Complete)
    return env.complete(request.answer)


def drive(env: FakeEnv, gen):
    """Answer a search generator's requests from the fake env until it returns (a test driver: the
    runtime's scheduler does this for real models, many searches at once)."""
    answer = None
    while True:
        try:
            request = gen.send(answer)
        except StopIteration as stop:
            return stop.value
        answer = reply(env, request)


def iterate(search: RainSearch, max_leaves=None) -> int:
    return drive(search.env, search.round(max_leaves))


def run(search: RainSearch):
    return drive(search.env, search.steps())


def cfg(**kw) -> RainConfig:
    return RainConfig(**{"token_set_lengths": (1, 2), "t_min": 2, "t_max": 6, "fresh_iterations": 0, **kw}).validate()


def test_first_iteration_expands_root_with_mixed_priors():
    env = FakeEnv(probs=(0.5, 0.3, 0.2))
    s = RainSearch(env, cfg())
    iterate(s)
    assert [c.tokens for c in s.root.children] == [(1,), (2,), (3,)]
    expected = 0.75 * np.array([0.5, 0.3, 0.2]) + 0.25 / 3
    assert [c.prior for c in s.root.children] == pytest.approx(list(expected / expected.sum()))
    assert env.calls[0] == ("expand", (), 1, 10, 9)  # depth 0 -> token sets of length 1; k = 10
    assert env.calls[1] == ("value", ())  # the leaf (plus its rollout) is evaluated
    assert s.root.visits == 1 and s.root.n == 1


def test_selection_is_argmax_of_normalised_q_plus_puct():
    values = {1: -1.0, 2: 0.5, 3: 1.0}
    env = FakeEnv(probs=(0.5, 0.3, 0.2), value=lambda a: values.get(a[0], 0.0) if a else 0.0)
    s = RainSearch(env, cfg(c_puct=2.0))
    iterate(s)  # expand root
    iterate(s)  # all children unvisited: q_hat = 0, highest prior wins
    assert s.root.children[0].visits == 1
    iterate(s)
    # recompute by hand: q_hat = (q - q_min) / (q_max - q_min + 1e-5) for visited children, else 0
    q_min, q_max = s.q_min, s.q_max
    ch = s.root.children
    # before this third iteration the root had n = 2 and child 0 had q = -1, n = 1
    scores = []
    for c, n, q in [(ch[0], 1, -1.0), (ch[1], 0, 0.0), (ch[2], 0, 0.0)]:
        q_hat = (q - q_min) / (q_max - q_min + 1e-5) if n > 0 else 0.0
        scores.append(q_hat + 2.0 * c.prior * math.sqrt(2) / (1 + n))
    chosen = int(np.argmax(scores))
    assert ch[chosen].visits == 1 and sum(c.visits for c in ch) == 2
    assert chosen == 1


def test_backup_running_mean_along_path():
    seq = iter([0.0, 1.0, -0.5, 0.25])
    env = FakeEnv(probs=(1.0,), value=lambda a: next(seq))
    s = RainSearch(env, cfg(token_set_lengths=(1,)))
    for _ in range(4):
        iterate(s)
    # a single chain: root -> (1,) -> (1,) -> (1,)
    a = s.root.children[0]
    b = a.children[0]
    c = b.children[0]
    assert s.root.visits == 4 and s.root.q == pytest.approx((0.0 + 1.0 - 0.5 + 0.25) / 4)
    assert a.visits == 3 and a.q == pytest.approx((1.0 - 0.5 + 0.25) / 3)
    assert b.visits == 2 and b.q == pytest.approx((-0.5 + 0.25) / 2)
    assert c.visits == 1 and c.q == pytest.approx(0.25)
    assert s.stats.rewinds == 4
    assert s.q_min == -1.0 and s.q_max == 1.0


def test_similarity_update_moves_similar_siblings():
    # children 1 and 2 embed identically (cosine 1); child 3 is orthogonal
    emb = {1: np.array([1.0, 0, 0]), 2: np.array([1.0, 0, 0]), 3: np.array([0, 1.0, 0])}
    values = {1: 0.6, 2: -0.4, 3: 0.0}
    env = FakeEnv(probs=(0.5, 0.3, 0.2), value=lambda a: values[a[0]] if a else 0.0,
                  embed=lambda span: emb[span[0]])
    s = RainSearch(env, cfg(similarity_gamma=0.2, similarity_threshold=0.95))
    iterate(s)  # root
    iterate(s)  # child 1 visited, value 0.6: siblings have no embedding yet -> no update
    c1, c2, c3 = s.root.children
    assert c1.visits == 1 and c2.n == 0 and c1.similarity_updates == 0
    # force the next selection onto child 2
    c1.prior, c2.prior, c3.prior = 0.0, 1.0, 0.0
    iterate(s)  # child 2 visited, value -0.4; child 1 is identical -> n += 0.2, q moves toward -0.4
    assert c2.visits == 1
    assert c1.n == pytest.approx(1.2)
    assert c1.q == pytest.approx((0.6 * 1 + 0.2 * -0.4) / 1.2)
    assert c1.similarity_updates == 1 and c3.similarity_updates == 0
    assert c1.visits == 1  # real visits unchanged
    assert s.stats.similarity_updates == 1


def test_dynamic_addition_when_siblings_alike_and_bad():
    same = np.array([1.0, 0.0])
    env = FakeEnv(probs=(0.6, 0.4, 0.3, 0.2), value=lambda a: -1.0, embed=lambda span: same)
    s = RainSearch(env, cfg(num_candidates=2, t_max=50))
    iterate(s)  # root gets children (1,), (2,)
    iterate(s)
    iterate(s)  # both children visited, identical embeddings, q = -1 < 0
    assert len(s.root.children) == 2
    iterate(s)  # selection at the root adds the next most likely token
    added = [c for c in s.root.children if c.dynamic]
    assert [c.tokens for c in added] == [(3,)]
    assert s.stats.dynamic_additions == 1
    assert [c for c in env.calls if c[0] == "propose"] == [("propose", (), 1, 3, 0)]  # top-(children + 1)


def test_no_dynamic_addition_when_a_child_is_good():
    same = np.array([1.0, 0.0])
    env = FakeEnv(probs=(0.6, 0.4, 0.3), value=lambda a: 1.0 if a and a[0] == 1 else -1.0, embed=lambda s: same)
    s = RainSearch(env, cfg(num_candidates=2))
    for _ in range(5):
        iterate(s)
    assert s.stats.dynamic_additions == 0


def test_best_child_most_visits_then_q():
    s = RainSearch(FakeEnv(), cfg())
    a = Node((1,), 1, parent=s.root, n=3, q=0.1)
    b = Node((2,), 1, parent=s.root, n=3, q=0.5)
    c = Node((3,), 1, parent=s.root, n=2, q=0.9)
    s.root.children = [a, b, c]
    assert s.best_child(s.root) is b


def test_commit_keeps_subtree_and_remixes_priors():
    env = FakeEnv(probs=(0.5, 0.5))
    s = RainSearch(env, cfg())
    for _ in range(4):
        iterate(s)
    best = s.best_child(s.root)
    grand = [c.prior for c in best.children]
    s.commit(best)
    assert s.root is best and best.parent is None and s.answer == best.tokens
    mixed = 0.75 * np.array(grand) + 0.25 / len(grand)
    assert [c.prior for c in best.children] == pytest.approx(list(mixed / mixed.sum()))


def test_every_commit_and_round_reaches_the_runtime_as_a_request():
    """No side channel: the runtime learns of each commit (the answer so far) and of each round's
    end (a checkpoint with the search's status, before any round too) from the requests."""
    env = FakeEnv(probs=(0.6, 0.4), value=lambda a: 0.0, budget=3)
    r = run(RainSearch(env, cfg(t_max=4)))
    lengths = [len(c) for c in env.commits]
    assert env.commits == [r.tokens[:n] for n in lengths] and lengths == sorted(set(lengths))
    assert len(env.commits) == r.stats.steps and env.commits[-1] == r.tokens
    assert env.checkpoints[0] is None  # before the first round: is the budget already spent?
    rounds = env.checkpoints[1:]
    assert len(rounds) == r.stats.iterations  # one leaf per round at P = 1
    assert [c.iteration for c in rounds[:4]] == [1, 2, 3, 4] and rounds[0].step == 1 and rounds[4].step == 2


def test_early_stop_once_best_child_is_good_enough():
    env = FakeEnv(probs=(0.9, 0.1), value=lambda a: 1.0, budget=1)
    s = RainSearch(env, cfg(t_min=2, t_max=50, value_threshold=0.8))
    result = run(s)
    # stop as soon as the most visited child has more than t_min visits and q > V:
    # iteration 1 expands, then the best child needs 3 visits -> 4 iterations
    assert result.stats.iterations_per_step == [4]
    assert result.tokens == (1,)


def test_runs_t_max_iterations_when_nothing_is_good():
    env = FakeEnv(probs=(0.5, 0.5), value=lambda a: 0.0, budget=1)
    result = run(RainSearch(env, cfg(t_min=2, t_max=7)))
    assert result.stats.iterations_per_step == [7]


def test_visits_below_new_root_count_toward_t_max():
    env = FakeEnv(probs=(1.0,), value=lambda a: 0.0, budget=3)
    result = run(RainSearch(env, cfg(token_set_lengths=(1,), t_max=6, fresh_iterations=0)))
    # step 1: 6 iterations; the chain's child has 5 of them, so step 2 runs 1, and so on
    assert result.stats.iterations_per_step[0] == 6
    assert result.stats.iterations_per_step[1] == 1
    assert result.tokens == (1, 1, 1)


def test_fresh_iterations_guarantee_new_work():
    env = FakeEnv(probs=(1.0,), value=lambda a: 0.0, budget=2)
    result = run(RainSearch(env, cfg(token_set_lengths=(1,), t_max=6, fresh_iterations=4)))
    assert result.stats.iterations_per_step == [6, 4]  # max(t_max, visits + fresh) - visits


def test_stops_at_end_of_answer_token():
    # candidates (1,) and EOS-like (0,) with the EOS set preferred and good
    env = FakeEnv(probs=(0.3, 0.7), value=lambda a: 1.0 if a and a[-1] == EOS else 0.0, budget=10)
    env._candidates = lambda length, n: [((1,) * length, 0.3), ((EOS,), 0.7)]
    result = run(RainSearch(env, cfg(t_min=1)))
    assert result.tokens[-1] == EOS
    assert len(result.tokens) < 10


def test_token_set_lengths_grow_with_depth():
    env = FakeEnv(probs=(1.0,), budget=20)
    s = RainSearch(env, cfg(token_set_lengths=(1, 2, 4), t_max=4))
    run(s)
    lengths = [c[2] for c in env.calls if c[0] == "expand"]
    assert lengths[:4] == [1, 2, 4, 4]


def test_terminal_leaf_is_evaluated_not_expanded():
    env = FakeEnv(probs=(1.0,), budget=1)
    s = RainSearch(env, cfg(token_set_lengths=(1,)))
    for _ in range(3):
        iterate(s)
    leaf = s.root.children[0]
    assert leaf.children == [] and leaf.visits == 2
    assert [c[1] for c in env.calls if c[0] == "expand"] == [()]  # the root alone was expanded
    assert [c for c in env.calls if c == ("value", leaf.tokens)] == [("value", leaf.tokens)] * 2


def test_deterministic_under_seed():
    def search(seed):
        env = FakeEnv(probs=(0.4, 0.3, 0.2, 0.1), value=lambda a: ((sum(a) * 7919) % 13) / 6.0 - 1.0,
                      budget=5, seed=seed)
        r = run(RainSearch(env, cfg(t_max=8, token_set_lengths=(1,)), trace=True))
        return r.tokens, r.stats.iterations_per_step, [st.tree for st in r.steps]

    assert search(3) == search(3)
    assert search(3) != search(4)


def test_trace_records_every_node():
    env = FakeEnv(probs=(0.5, 0.5), budget=2)
    r = run(RainSearch(env, cfg(t_max=3), trace=True))
    tree = r.steps[0].tree
    assert set(tree) >= {"tokens", "text", "visits", "value", "prior", "similarity_updates", "dynamic", "children"}
    assert len(tree["children"]) == 2 and tree["visits"] == 3


def test_budget_stop_commits_best_path_then_completes():
    env = FakeEnv(probs=(0.6, 0.4), value=lambda a: 0.0, budget=10)
    env.eval_budget, env.budget_total = 5, 10
    r = run(RainSearch(env, cfg(token_set_lengths=(1,), t_max=50)))
    assert sum(c[0] == "value" for c in env.calls) == 5  # no iteration after the budget ran out
    assert r.stats.budget_stopped
    # the most visited path of the tree so far is committed, then plain decoding finishes the answer
    assert r.stats.iterations_per_step[0] == 5 and all(i == 0 for i in r.stats.iterations_per_step[1:])
    assert r.tokens[-r.stats.completed_tokens:] == (7,) * r.stats.completed_tokens
    assert len(r.tokens) == 10 and r.stats.completed_tokens < 10


def test_no_budget_no_stop():
    env = FakeEnv(probs=(0.6, 0.4), value=lambda a: 0.0, budget=2)
    r = run(RainSearch(env, cfg(t_max=4)))
    assert not r.stats.budget_stopped and r.stats.completed_tokens == 0


def test_parallel_leaves_are_distinct_and_all_backed_up():
    env = FakeEnv(probs=(0.4, 0.3, 0.2, 0.1), value=lambda a: 0.0, budget=5)
    s = RainSearch(env, cfg(parallel_leaves=3, t_max=20))
    assert iterate(s) == 1  # only the root exists: one leaf
    assert iterate(s) == 3  # virtual loss spreads the round over three different children
    assert sorted(c.visits for c in s.root.children) == [0, 1, 1, 1]
    assert s.root.visits == 4 and all(c.pending == 0 for c in s.root.children)
    expands = [c for c in env.calls if c[0] == "expand"]
    assert len({c[1] for c in expands}) == len(expands) == 4


def test_parallel_round_never_overshoots_the_budget():
    env = FakeEnv(probs=(0.4, 0.3, 0.2, 0.1), value=lambda a: 0.0, budget=1)
    r = run(RainSearch(env, cfg(parallel_leaves=4, t_max=6)))
    assert r.stats.iterations_per_step == [6] and r.stats.iterations == 6


def test_parallel_search_runs_the_same_budget():
    env = FakeEnv(probs=(0.5, 0.3, 0.2), value=lambda a: ((sum(a) * 31) % 7) / 3.5 - 1.0, budget=4)
    r = run(RainSearch(env, cfg(t_max=9, parallel_leaves=3, token_set_lengths=(1,))))
    assert len(r.tokens) == 4
    assert r.stats.iterations_per_step[0] == 9  # rounds of 3 fill the step's budget exactly
    assert r.stats.rewinds == r.stats.iterations == sum(r.stats.iterations_per_step)


def _lockstep_case(seed, budget):
    env = FakeEnv(probs=(0.4, 0.3, 0.2, 0.1), value=lambda a: ((sum(a) * 7919 + seed) % 13) / 6.0 - 1.0,
                  budget=budget, seed=seed)
    return RainSearch(env, cfg(t_max=8, token_set_lengths=(1, 2)), trace=True)


def _summary(r):
    return r.tokens, r.stats.iterations_per_step, r.stats.similarity_updates, [st.tree for st in r.steps]


def test_interleaved_searches_equal_each_search_alone():
    """Searches share nothing: B of them stepped request by request in turn (answers of different
    lengths, finishing at different times) each build exactly the tree they build alone."""
    cases = [(1, 3), (2, 6), (3, 1), (4, 4)]
    alone = [_summary(run(_lockstep_case(seed, budget))) for seed, budget in cases]
    searches = [_lockstep_case(seed, budget) for seed, budget in cases]
    gens = {i: s.steps() for i, s in enumerate(searches)}
    pending = {i: gen.send(None) for i, gen in gens.items()}
    done = {}
    while pending:
        for i in list(pending):
            try:
                pending[i] = gens[i].send(reply(searches[i].env, pending[i]))
            except StopIteration as stop:
                done[i] = _summary(stop.value)
                del pending[i]
    assert [done[i] for i in range(len(cases))] == alone
