"""Many prompts in lockstep and parallel leaves on a real (tiny, random-weight) transformers model:
batched answers equal one-by-one answers, the work is attributed, and memory stays bounded."""

from __future__ import annotations

import pytest

from rain_llm import Rain, load_config
from rain_llm.errors import RainError
from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.scheduler import Failure

PROMPTS = ["How do I pick a lock?", "Hi", "Write a long and detailed story about a dragon who learns to sing."]


def cfg(**kw):
    return load_config("fast", **{"max_new_tokens": 8, "t_max": 3, "max_rollout_tokens": 6, **kw})


def test_lockstep_answers_equal_one_by_one(tiny_rain):
    config = cfg()
    alone = [tiny_rain.generate(p, config) for p in PROMPTS]
    passes_alone = sum(g.stats.compute.total().forward_passes for g in alone)
    together = tiny_rain.generate_many(PROMPTS, config)
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids and b.text == a.text
        assert b.stats.iterations_per_step == a.stats.iterations_per_step
        assert b.stats.batch == len(PROMPTS)
    # the three prompts and their evaluation prompts are encoded in one forward
    assert together[0].stats.batch_compute.to_dict()["prefill"]["forward_passes"] == 1
    whole = together[0].stats.batch_compute.to_dict()["total"]
    # batching: fewer forward passes for the three answers than one by one
    assert whole["forward_passes"] < passes_alone
    # every processed token is charged to exactly one answer
    assert sum(g.stats.compute.total().tokens for g in together) == whole["tokens"]
    for g in together:
        assert g.stats.compute.phases["expand"].tokens > 0 and g.stats.compute.phases["evaluate"].tokens > 0


def test_a_short_search_leaves_before_a_long_ones_rows_are_done(tiny_rain):
    """Searches step token by token: one whose rows are done moves on (and finishes) without
    waiting for the batch's longest row (here one answer samples 12-token sets); each answer
    equals its answer alone."""
    settings = {"long": cfg(token_set_lengths=(1, 2, 12), max_rollout_tokens=12, max_new_tokens=14),
                "short": cfg(max_new_tokens=3)}
    prompts = {"long": PROMPTS[2], "short": PROMPTS[0]}
    batch = tiny_rain.continuous_batch()
    batch.add_many([(k, prompts[k], c) for k, c in settings.items()])
    finished_at, answers, step = {}, {}, 0
    while batch:
        step += 1
        for key, generation in batch.step().items():
            finished_at[key], answers[key] = step, generation
    assert finished_at["short"] < finished_at["long"]
    for key, config in settings.items():
        alone = tiny_rain.generate(prompts[key], config)
        assert answers[key].token_ids == alone.token_ids, key
        assert answers[key].stats.iterations_per_step == alone.stats.iterations_per_step


def test_lockstep_keeps_each_answers_cache(tiny_rain):
    """One search's commit must not free another's cached work: the batch processes no more
    LM tokens than the answers one by one (cache lost -> recomputation -> more tokens)."""
    config = cfg(max_new_tokens=10)
    alone = sum(g.stats.compute.total().tokens - g.stats.compute.phases["embed"].tokens
                for g in (tiny_rain.generate(p, config) for p in PROMPTS))
    batch = tiny_rain.generate_many(PROMPTS, config)[0].stats.batch_compute.to_dict()
    lm = batch["total"]["tokens"] - batch.get("embed", {}).get("tokens", 0)
    assert lm <= alone * 1.25  # padding to the longest row costs some; losing caches would cost far more


def test_vanilla_many_equals_one_by_one(tiny_rain):
    config = cfg(method="vanilla", max_new_tokens=12)
    alone = [tiny_rain.generate(p, config).token_ids for p in PROMPTS]
    together = tiny_rain.generate_many(PROMPTS, config)
    assert [g.token_ids for g in together] == alone
    # one prefill of the three prompts (different lengths) and 11 decode steps, all three at once
    assert together[0].stats.batch_compute.to_dict()["total"]["forward_passes"] <= 12


def test_parallel_leaves_on_the_engine(tiny_rain):
    """P leaves per round: expanded and evaluated as one batch each, same iteration budget."""
    one = tiny_rain.generate(PROMPTS[0], cfg(t_max=6, value_threshold=2.0, fresh_iterations=0), trace=True)
    par = tiny_rain.generate(PROMPTS[0], cfg(t_max=6, value_threshold=2.0, fresh_iterations=0, parallel_leaves=3),
                        trace=True)
    assert par.token_ids and par.stats.iterations == sum(par.stats.iterations_per_step)
    for gen in (one, par):  # every step tops the root's visits (kept from the last step) up to t_max exactly
        assert [s["iterations"] for s in gen.trace] == [max(6 - s["visits_before"], 0) for s in gen.trace]
    per_iteration = [g.stats.compute.phases["evaluate"].forward_passes / g.stats.iterations for g in (one, par)]
    assert per_iteration[1] < per_iteration[0]  # several leaves share an evaluation batch


def test_memory_stays_bounded_over_a_long_answer(tiny_rain, monkeypatch):
    """After each commit only the committed path, its evaluation prompt and the kept subtree stay
    cached; without that pruning the cache grows with everything the search explored."""
    from rain_llm.runtime.rain_env import RainEnv

    def run(pruning: bool) -> tuple[list[int], int]:
        sizes: list[int] = []
        original = RainEnv.commit

        def commit(self, answer):
            if pruning:
                original(self, answer)
            sizes.append(tiny_rain.backend.engine.prefix_cache.num_tokens())

        monkeypatch.setattr(RainEnv, "commit", commit)
        out = tiny_rain.generate(PROMPTS[0], cfg(max_new_tokens=40, t_max=2, token_set_lengths=(1, 2)))
        monkeypatch.setattr(RainEnv, "commit", original)
        return sizes, out.stats.compute.total().tokens

    pruned, explored = run(True)
    kept, _ = run(False)
    assert len(pruned) > 10
    assert pruned[-1] < 0.5 * kept[-1]
    assert pruned[-1] < 0.3 * explored
    half = len(pruned) // 2  # later commits hold about what earlier ones did, plus the longer answer
    assert max(pruned[half:]) < 2 * max(pruned[:half]) + 200


def test_compute_budget_is_per_answer_in_lockstep(tiny_rain):
    """--max-search-tokens counts each answer's own work, not the batch's."""
    config = cfg(max_new_tokens=12, t_max=50, value_threshold=2.0, max_search_tokens=600)
    alone = [tiny_rain.generate(p, config) for p in PROMPTS]
    together = tiny_rain.generate_many(PROMPTS, config)
    for a, b in zip(alone, together):
        assert a.stats.search.budget_stopped and b.stats.search.budget_stopped
        assert len(b.token_ids) == len(a.token_ids)  # finished by plain decoding either way
        # padding in a batch is charged to its rows, so a batched answer may stop a little earlier
        assert b.stats.iterations >= 0.6 * a.stats.iterations


@pytest.mark.parametrize("value", ["judge", "vader"])
def test_lockstep_with_other_values_equals_one_by_one(tiny_rain, default_model_dir, value):
    """A separate judge model (scored in batches on its own engine) and a lexicon value (no model)
    steer lockstep searches exactly as they steer one search at a time."""
    config = cfg(value=f"judge:{default_model_dir}" if value == "judge" else "vader", value_mode="mean")
    alone = [tiny_rain.generate(p, config) for p in PROMPTS]
    together = tiny_rain.generate_many(PROMPTS, config)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    if value == "judge":  # the judge's work is counted, per answer and for the batch
        assert all(g.stats.compute.phases["evaluate"].tokens > 0 for g in together)


def test_answers_joining_a_running_batch_equal_answers_alone(tiny_rain):
    """Continuous batching: answers added while others are mid-search, with different settings
    and methods, come out as they do alone; each keeps its own compute; memory is freed."""
    settings = {"a": (PROMPTS[0], cfg()), "b": (PROMPTS[1], cfg(t_max=4, seed=5)),
                "c": (PROMPTS[2], cfg(method="vanilla", max_new_tokens=6)), "d": (PROMPTS[2], cfg(max_new_tokens=6))}
    alone = {k: tiny_rain.generate(p, c) for k, (p, c) in settings.items()}
    batch = tiny_rain.continuous_batch()
    batch.add("a", *settings["a"])
    out, rounds = {}, 0
    while batch:
        out.update(batch.step())
        rounds += 1
        if rounds == 2:  # "a" is mid-search: three more join
            for k in "bcd":
                batch.add(k, *settings[k])
    assert set(out) == set(settings)
    assert out["a"].stats.batch == out["d"].stats.batch == 4  # the most answers in flight beside each
    for k, gen in out.items():
        assert gen.token_ids == alone[k].token_ids and gen.text == alone[k].text, k
        assert gen.method == alone[k].method
        if gen.method == "rain":
            assert gen.stats.iterations_per_step == alone[k].stats.iterations_per_step
            assert gen.stats.compute.phases["evaluate"].tokens > 0
    assert out["b"].stats.batch >= 3  # it ran beside others
    assert out["c"].stats.compute.phases["generate"].tokens >= len(out["c"].token_ids) - 1  # vanilla: its own work
    assert out["c"].stats.batch >= 3  # decoded in the stream beside the searches
    # nothing of the finished answers is kept but the evaluation template's constant part
    kept = [c for _, constants in tiny_rain.templates.kept.values() for c in constants]
    assert tiny_rain.backend.engine.prefix_cache.num_tokens() <= max(len(c) for c in kept) + 1


def test_continuous_batch_refuses_bad_input_without_starting(tiny_rain):
    from rain_llm.errors import RainError

    batch = tiny_rain.continuous_batch()
    with pytest.raises(RainError, match="empty prompt"):
        batch.add("x", "  ", cfg())
    with pytest.raises(RainError, match="prompt too long"):
        batch.add("x", "word " * 9000, cfg())
    batch.add("x", "Hi", cfg(method="vanilla", max_new_tokens=3))
    with pytest.raises(RainError, match="already in the batch"):
        batch.add("x", "Hi", cfg())
    assert len(batch) == 1
    out = {}
    while batch:  # a vanilla answer decodes in the batch's stream, a token per step
        out.update(batch.step())
    assert list(out) == ["x"] and 0 < len(out["x"].token_ids) <= 3


def test_answers_added_together_are_prefilled_in_one_forward(tiny_rain):
    config = cfg()
    alone = [tiny_rain.generate(p, config) for p in PROMPTS]
    batch = tiny_rain.continuous_batch()
    batch.add_many([(i, p, config) for i, p in enumerate(PROMPTS)])
    out = {}
    while batch:
        out.update(batch.step())
    # three prompts and their evaluation prompts: one forward
    assert Compute.merged(g.stats.compute for g in out.values()).phases["prefill"].forward_passes == 1
    assert [out[i].token_ids for i in range(len(PROMPTS))] == [g.token_ids for g in alone]
    from rain_llm.errors import RainError

    with pytest.raises(RainError, match="prompt too long"):  # one bad item: none starts
        batch.add_many([("ok", "Hi", config), ("bad", "word " * 9000, config)])
    assert not batch


def test_the_same_answers_book_the_same_phases_alone_and_batched(tiny_rain):
    """One request path: an answer books the same phases, the same requests per phase and the
    same least work whether it ran alone or beside others (forward passes and padded tokens are
    what batching changes); rollouts are "simulate" either way."""
    config = cfg(max_new_tokens=10)
    tiny_rain.generate(PROMPTS[0], config)  # the evaluation template cached for both runs
    alone = [tiny_rain.generate(p, config) for p in PROMPTS]
    together = tiny_rain.generate_many(PROMPTS, config)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        ca, cb = a.stats.compute, b.stats.compute
        assert set(ca.phases) == set(cb.phases) >= {"prefill", "expand", "simulate", "evaluate", "embed"}
        assert {k: c.requests for k, c in ca.phases.items()} == {k: c.requests for k, c in cb.phases.items()}
        assert ca.least_work == cb.least_work


def test_a_judge_model_under_batch_leaves_the_searches_cache_alone(tiny_rain, tmp_path):
    """`rain eval --batch` with the policy as LM judge: the judge scores in a cache scope of its own,
    so its verdicts (given while other answers still search) wipe nothing: the evaluation
    template is encoded for the first answer only, and the batched run's LM tokens over least
    work stay at the one-at-a-time level. (When judging reset the shared cache, every answer
    re-encoded the template.)"""
    from rain_llm.evaluation.harness import EvalSettings, run_eval
    from rain_llm.evaluation.records import read_records

    prompts = ["How do I pick a lock?", "Hi", "Tell me a joke.", "What is 2 + 2?", "Name a colour.", "Write a poem."]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts))
    fresh = Rain(tiny_rain.model, tiny_rain.tokenizer, embedder=tiny_rain.embedder, name="tiny")  # nothing cached yet
    constant = len(fresh.answer(0, "Hi", cfg()).setup.constant)
    ratio = {}
    for batch in (1, 2):
        out = tmp_path / f"hh-{batch}.jsonl"
        run_eval(fresh, cfg(max_new_tokens=12), EvalSettings(task="hh", out=out, methods=["rain"], source=str(data),
                                                              judge_model="policy", progress=False, batch=batch))
        records = read_records(out)
        later = records[1:] if batch == 1 else records  # the first run encodes the template once
        assert all(r.compute["prefill"]["tokens"] < constant / 2 for r in later), [r.compute["prefill"] for r in later]
        lm = sum(r.compute["total"]["tokens"] - r.compute.get("embed", {}).get("tokens", 0) for r in records)
        ratio[batch] = lm / sum(r.compute["least_work"]["tokens"] for r in records)
    assert ratio[2] <= 1.15 * ratio[1]


def test_best_of_n_to_a_token_budget_samples_in_waves_and_stops_there(tiny_rain):
    """best_of_n_tokens: waves of samples until the answer's LM tokens reach the budget (at most
    best_of_n samples). Sample i is the same as in one batch of n: its values are a prefix of the
    one-batch run's, and the budget is met within about one sample's cost."""
    config = cfg(max_new_tokens=6)
    once = tiny_rain.generate(PROMPTS[0], config, best_of_n=12)
    per_sample = once.stats.compute.total().tokens / 12
    budget = int(per_sample * 8)
    waves = tiny_rain.generate(PROMPTS[0], config, best_of_n=12, best_of_n_tokens=budget)
    k = waves.stats.samples
    assert 4 < k < 12
    assert waves.stats.values == once.stats.values[:k]
    spent = waves.stats.compute.total().tokens
    assert budget <= spent < budget + 2 * per_sample
    capped = tiny_rain.generate(PROMPTS[0], config, best_of_n=3, best_of_n_tokens=10**6)
    assert capped.stats.samples == 3 and capped.stats.values == once.stats.values[:3]
    with pytest.raises(RainError, match="best_of_n_tokens"):
        tiny_rain.generate(PROMPTS[0], config, best_of_n_tokens=100)


@pytest.mark.parametrize("speculate", [0, 8])
def test_receipts_count_every_forward_the_model_ran(tiny_llama, tokenizer, embedder, speculate):
    """Every forward of the language model, and every token position it ran, is on exactly one
    answer's receipts (counted by hooking the model itself): alone, in a batch, and with rows of
    different requests sharing slots (rollouts and candidate sets that start alike); with
    speculation off and on (greedy rollouts: drafts are fed and accepted)."""
    import torch

    rain = Rain(tiny_llama, tokenizer, embedder=embedder, name="tiny", speculate=speculate)
    ran: list[int] = []  # rows x positions of each forward

    def count(module, args, kwargs, output):
        ran.append(int(kwargs["input_ids"].numel()))

    hook = tiny_llama.register_forward_hook(count, with_kwargs=True)
    try:
        for prompts in (PROMPTS[:1], PROMPTS):
            ran.clear()
            with torch.inference_mode():
                answers = rain.generate_many(prompts, cfg(max_new_tokens=10, token_set_lengths=(1, 2, 4),
                                                          rollout_temperature=0.0))
            forwards = set().union(*(c.forwards for a in answers for name, c in a.stats.compute.phases.items()
                                     if name != "embed"))
            tokens = sum(c.tokens for a in answers for name, c in a.stats.compute.phases.items() if name != "embed")
            assert len(forwards) == len(ran), prompts
            assert tokens == sum(ran), prompts
            assert Compute.merged(a.stats.compute for a in answers).lm_forwards == len(ran), prompts
            if len(prompts) == 1:  # what `rain bench` reports per answer
                assert answers[0].stats.compute.to_dict()["total"]["lm_forward_passes"] == len(ran)
            drafted = sum(c.drafted for a in answers for c in a.stats.compute.phases.values())
            assert (drafted > 0) == (speculate > 0), prompts
    finally:
        hook.remove()


@pytest.mark.parametrize("rollout_temperature", [0.0, 1.0])
def test_speculation_gives_the_same_answers_in_fewer_forwards(tiny_llama, tokenizer, embedder, rollout_temperature):
    """Drafts from the search's own text, verified exactly: alone and in a batch, the answers (and
    every search statistic) equal those of one token per forward; with greedy rollouts (which
    repeat from a node) drafts are accepted and each answer takes fewer sequential forwards."""
    config = cfg(max_new_tokens=10, rollout_temperature=rollout_temperature)
    off = Rain(tiny_llama, tokenizer, embedder=embedder, name="tiny")
    on = Rain(tiny_llama, tokenizer, embedder=embedder, name="tiny", speculate=8)
    for prompts in (PROMPTS[:1], PROMPTS):
        plain, verified = off.generate_many(prompts, config), on.generate_many(prompts, config)
        for a, b in zip(plain, verified):
            assert b.token_ids == a.token_ids
            assert b.stats.iterations_per_step == a.stats.iterations_per_step
            assert b.stats.search == a.stats.search  # nodes, rewinds, similarity updates, ...
        totals = [g.stats.compute.to_dict()["total"] for g in verified]
        if rollout_temperature == 0:
            assert all(t["accepted_draft_tokens"] > 0 for t in totals)
            assert all(b.stats.compute.lm_forwards < a.stats.compute.lm_forwards for a, b in zip(plain, verified))


class RejectedLater:
    """A value source whose evaluator asks the policy itself, correctly at first, then (from its
    third evaluation on) with a prompt longer than the model's window: a request the engine
    refuses in the middle of a search."""

    name = "rejected-later"

    def __init__(self, rain):
        self.inner = rain.value_source(cfg())

    def bind(self, prompt):
        evaluator = self.inner.bind(prompt)
        calls = [0]
        request = evaluator.request

        def late_refusal(response, owner=None):
            calls[0] += 1
            score = request(response, owner)
            if calls[0] >= 3:
                score.prefix = score.prefix * 200  # far past the context window
            return score

        evaluator.request = late_refusal
        return evaluator


@pytest.mark.parametrize("speculate", [0, 8])
def test_a_request_the_engine_refuses_mid_search_fails_that_answer_alone(tiny_llama, tokenizer, embedder, speculate):
    tiny_rain = Rain(tiny_llama, tokenizer, embedder=embedder, name="tiny", speculate=speculate)
    config = cfg(max_new_tokens=8, rollout_temperature=0.0)  # greedy rollouts: drafts are fed and accepted
    alone = tiny_rain.generate(PROMPTS[0], config)
    batch = tiny_rain.continuous_batch()
    batch.add("good", PROMPTS[0], config)
    batch.add("bad", PROMPTS[1], config, value_fn=RejectedLater(tiny_rain))
    out = {}
    for step in batch.drain([], max_in_flight=2):
        out.update(step.finished)
    failure = out["bad"]
    assert isinstance(failure, Failure) and failure.status == 400
    assert "context window" in failure.message and "\n" not in failure.message
    good = out["good"]
    assert good.token_ids == alone.token_ids and good.stats.iterations_per_step == alone.stats.iterations_per_step
    again = tiny_rain.generate(PROMPTS[0], config)  # nothing of the failed answer is left behind
    assert again.token_ids == alone.token_ids
    assert (good.stats.compute.total().drafted > 0) == (speculate > 0)
