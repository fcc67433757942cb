"""The transformers engine on tiny random models: every reuse path equals a full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rain_llm.engine.base import Row
from rain_llm.engine.hf.engine import HFEngine

TOL = 1e-4


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].float().numpy()


def make(model, tokenizer, reuse=True, seed=0):
    return HFEngine(model, tokenizer, reuse_cache=reuse, seed=seed, stop_ids=[tokenizer.eos_token_id])


@pytest.fixture
def ctx(tokenizer):
    return tokenizer("The quick brown fox jumps over the lazy dog, and then")["input_ids"]


def test_prefill_and_every_reuse_path_match_full_forward(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    # fresh context
    assert np.abs(eng.next_logits(ctx) - full_logits(model, ctx)).max() < TOL
    # the same context again: served from the cache, no forward pass
    passes = eng.counters.total().forward_passes
    assert np.abs(eng.next_logits(ctx) - full_logits(model, ctx)).max() < TOL
    assert eng.counters.total().forward_passes == passes
    # a strict prefix ending inside a cached chunk (split, last token re-run)
    short = ctx[:7]
    assert np.abs(eng.next_logits(short) - full_logits(model, short)).max() < TOL
    # a context that diverges inside a cached chunk
    fork = ctx[:5] + [42, 43, 44]
    assert np.abs(eng.next_logits(fork) - full_logits(model, fork)).max() < TOL
    # an extension of a cached context
    longer = ctx + [100, 200, 300]
    assert np.abs(eng.next_logits(longer) - full_logits(model, longer)).max() < TOL


def test_sampled_rows_are_cached_correctly(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    samples = eng.sample(ctx, 4, 6, temperature=1.0, top_k=15, greedy_first=True)
    assert len(samples) == 4
    for s in samples:
        ids = ctx + s.tokens
        assert np.abs(eng.next_logits(ids) - full_logits(model, ids)).max() < TOL
        # continuing from a sampled row needs one forward of its last token only
        before = eng.counters.total().tokens
        eng.next_logits(ids + [5])
        assert eng.counters.total().tokens - before == 1


def test_greedy_row_is_argmax_and_logprobs_are_right(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    s = eng.sample(ctx, 3, 4, temperature=2.0, top_k=15, greedy_first=True)
    ids, total = list(ctx), 0.0
    for tok in s[0].tokens:
        logits = torch.tensor(full_logits(model, ids)) / 2.0
        assert tok == int(torch.argmax(logits))
        kth = torch.topk(logits, 15).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        total += float(torch.log_softmax(logits, -1)[tok])
        ids.append(tok)
    assert s[0].logprob == pytest.approx(total, abs=1e-4)
    for row in s[1:]:  # sampled rows stay inside the top-k
        ids = list(ctx)
        for tok in row.tokens:
            assert tok in torch.topk(torch.tensor(full_logits(model, ids)), 15).indices.tolist()
            ids.append(tok)


def test_batched_sampling_equals_row_by_row(tiny, tokenizer, ctx):
    _, model = tiny
    uniforms = np.random.default_rng(7).random((5, 6))
    batched = make(model, tokenizer).sample(ctx, 5, 6, temperature=1.0, top_k=15, greedy_first=True,
                                             uniforms=uniforms)
    for i in range(5):
        single = make(model, tokenizer).sample(ctx, 1, 6, temperature=1.0, top_k=15, greedy_first=(i == 0),
                                                uniforms=uniforms[i:i + 1])[0]
        assert single.tokens == batched[i].tokens
        assert single.logprob == pytest.approx(batched[i].logprob, abs=1e-4)


def test_seeded_sampling_is_reproducible(tiny, tokenizer, ctx):
    _, model = tiny
    a = make(model, tokenizer, seed=3).sample(ctx, 4, 5, temperature=1.0, top_k=15, greedy_first=False)
    b = make(model, tokenizer, seed=3).sample(ctx, 4, 5, temperature=1.0, top_k=15, greedy_first=False)
    c = make(model, tokenizer, seed=4).sample(ctx, 4, 5, temperature=1.0, top_k=15, greedy_first=False)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]


def test_score_options_matches_full_forward(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    eng.next_logits(ctx[:6])  # a partly cached prefix
    suffixes = [[11, 12, 13, 14], [15, 16]]
    options = [32, 33]
    got = eng.score_options(ctx, suffixes, options)
    for row, suf in enumerate(suffixes):
        probs = torch.softmax(torch.tensor(full_logits(model, ctx + suf)), -1)
        assert got[row] == pytest.approx([float(probs[o]) for o in options], rel=1e-3, abs=1e-7)


def test_reuse_off_gives_same_logits_and_more_work(tiny, tokenizer, ctx):
    _, model = tiny
    on, off = make(model, tokenizer), make(model, tokenizer, reuse=False)
    for eng in (on, off):
        eng.next_logits(ctx)
        eng.next_logits(ctx + [7, 8])
    assert np.abs(on.next_logits(ctx + [7, 8, 9]) - off.next_logits(ctx + [7, 8, 9])).max() < TOL
    assert on.counters.total().tokens == len(ctx) + 2 + 1
    assert off.counters.total().tokens == len(ctx) + (len(ctx) + 2) + (len(ctx) + 3)


def test_counters_add_up_per_phase(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    with eng.counters.phase("prefill"):
        eng.next_logits(ctx)
    with eng.counters.phase("expand"):
        eng.sample(ctx, 3, 4, temperature=1.0, top_k=15, greedy_first=True)
    d = eng.counters.to_dict()
    assert d["prefill"] == {"forward_passes": 1, "tokens": len(ctx), "seconds": d["prefill"]["seconds"]}
    steps = d["expand"]["forward_passes"]
    assert 1 <= steps <= 3  # 4 tokens: 3 fed (unless every row ended early)
    assert d["expand"]["tokens"] == 3 * steps
    assert d["total"]["tokens"] == len(ctx) + 3 * steps


def test_retain_frees_other_branches_and_stays_correct(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    rows = eng.sample(ctx, 4, 5, temperature=1.0, top_k=15, greedy_first=True)
    held = eng.prefix_cache.num_tokens()
    keep = ctx + rows[1].tokens
    eng.retain([keep])
    assert eng.prefix_cache.num_tokens() < held
    assert np.abs(eng.next_logits(keep) - full_logits(model, keep)).max() < TOL


def test_retain_exact_keeps_a_prefix_but_not_what_extends_it(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    eng.sample(ctx, 4, 5, temperature=1.0, top_k=15, greedy_first=True)
    head = ctx[:-2]  # ends inside the cached prompt chunk
    eng.retain([head])  # a plain prefix keeps everything extending it
    assert eng.prefix_cache.num_tokens() > len(ctx)
    eng.retain([head], exact=True)
    assert len(head) <= eng.prefix_cache.num_tokens() <= len(ctx)  # at most the chunk holding its end
    assert eng.prefix_cache.lookup(head)[2] >= len(head) - 1  # all cached (the last token re-run for its logits)
    assert np.abs(eng.next_logits(ctx) - full_logits(model, ctx)).max() < TOL


def test_vanilla_generate_equals_transformers_greedy(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    ours = eng.generate(ctx, 8)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ctx]), max_new_tokens=8, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    assert ours == ref[0, len(ctx):].tolist()[:len(ours)]


def test_rows_with_their_own_rules_in_one_batch(tiny, tokenizer, ctx):
    _, model = tiny
    rows = [Row(5, 2.0, 15, greedy=True), Row(5, 2.0, 15), Row(8, 1.0, 0, done=lambda t: len(t) >= 3)]
    uniforms = np.random.default_rng(1).random((3, 8))
    eng = make(model, tokenizer)
    batch = eng.decode_rows(ctx, rows, uniforms)
    assert [len(s.tokens) for s in batch][:2] == [5, 5] or any(t == tokenizer.eos_token_id for t in batch[0].tokens)
    assert len(batch[2].tokens) == 3  # its own stop rule
    for i, row in enumerate(rows):
        alone = make(model, tokenizer).decode_rows(ctx, [row], uniforms[i:i + 1])[0]
        assert alone.tokens == batch[i].tokens
        assert alone.logprob == pytest.approx(batch[i].logprob, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reuse_paths(tokenizer, ctx, dtype):
    from conftest import tiny_model

    model = tiny_model("llama", len(tokenizer)).to(dtype)
    eng = make(model, tokenizer)
    rows = eng.sample(ctx, 3, 4, temperature=1.0, top_k=15, greedy_first=True)
    for ids in (ctx, ctx[:6], ctx + rows[1].tokens):
        ours, ref = eng.next_logits(ids), full_logits(model, ids)
        assert np.abs(ours - ref).max() < 0.05 * max(1.0, np.abs(ref).max())
        assert int(np.argmax(ours)) == int(np.argmax(ref))


def test_score_options_long_uncached_prefix(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    prefix = ctx * 4  # much longer than the suffixes: encoded once, then the rows
    suffixes = [[11, 12], [13]]
    got = eng.score_options(prefix, suffixes, [32, 33])
    for row, suf in enumerate(suffixes):
        probs = torch.softmax(torch.tensor(full_logits(model, prefix + suf)), -1)
        assert got[row] == pytest.approx([float(probs[32]), float(probs[33])], rel=1e-3, abs=1e-7)
    before = eng.counters.total().tokens
    eng.score_options(prefix, suffixes, [32, 33])  # now cached: only the suffix rows run
    assert eng.counters.total().tokens - before == 2 * 2


def test_least_work_counts_each_distinct_position_once(tiny, tokenizer, ctx):
    _, model = tiny
    on, off = make(model, tokenizer), make(model, tokenizer, reuse=False)
    for eng in (on, off):
        eng.next_logits(ctx)
        eng.next_logits(ctx)
        eng.next_logits(ctx + [5, 6])
    assert on.counters.least.tokens == off.counters.least.tokens == len(ctx) + 2
    assert on.counters.total().tokens == len(ctx) + 2  # with reuse: no waste
    assert off.counters.total().tokens == 3 * len(ctx) + 2
    d = on.counters.to_dict()
    assert d["least_work"]["tokens"] == len(ctx) + 2
    on.score_options(ctx, [[7, 8], [9]], [32, 33])
    assert on.counters.least.tokens == len(ctx) + 2 + 3


def test_groups_of_different_contexts_decode_as_alone(tiny, tokenizer, ctx):
    """Several contexts in one left-padded batch give each row the tokens and log-probabilities
    it gets alone (same uniforms), and leave a prefix tree that is still exact."""
    _, model = tiny
    contexts = [ctx, ctx[:5], ctx + [17, 18, 19, 20, 21], [3, 9] + ctx[2:8]]
    rows = [[Row(5, 1.0, 15, greedy=True), Row(5, 1.0, 15)], [Row(3, 2.0, 0)],
            [Row(6, 1.0, 15), Row(2, 1.0, 15), Row(6, 1.0, 0, done=lambda t: len(t) >= 4)], [Row(4, 1.0, 15)]]
    rng = np.random.default_rng(3)
    uniforms = [rng.random((len(r), 6)) for r in rows]
    eng = make(model, tokenizer)
    eng.next_logits(ctx[:7])  # some contexts partly cached, one fully, others not at all
    eng.next_logits(contexts[2])
    batch = eng.decode_groups(list(zip(contexts, rows, uniforms)))
    for c, rs, u, got in zip(contexts, rows, uniforms, batch):
        alone = make(model, tokenizer).decode_rows(c, rs, u)
        assert [s.tokens for s in got] == [s.tokens for s in alone]
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in alone], abs=1e-4)
        for s in got:  # what the batch stored in the prefix tree is exact
            ids = c + s.tokens
            assert np.abs(eng.next_logits(ids) - full_logits(model, ids)).max() < TOL


def test_groups_charge_each_owner_its_rows(tiny, tokenizer, ctx):
    from rain_llm.engine.base import Counters

    _, model = tiny
    eng = make(model, tokenizer)
    a, b = Counters(), Counters()
    eng.decode_groups([(ctx, [Row(3, 1.0, 0)] * 2, None), (ctx[:4], [Row(3, 1.0, 0)], None)], owners=[a, b])
    total = eng.counters.total().tokens
    assert a.total().tokens + b.total().tokens == total
    assert a.total().tokens > b.total().tokens > 0
    assert a.least.tokens == len(ctx) + 2 * 2 and b.least.tokens == 4 + 2


def test_score_many_equals_score_options(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    eng.next_logits(ctx[:6])
    requests = [(ctx, [[11, 12, 13, 14], [15, 16]], [32, 33]), (ctx[:4] + [50, 51], [[11, 12], [15]], [40, 41]),
                (ctx * 2, [[7], [8, 9, 10]], [32, 33])]
    got = eng.score_many(requests)
    for (prefix, suffixes, options), probs in zip(requests, got):
        alone = make(model, tokenizer).score_options(prefix, suffixes, options)
        assert probs == pytest.approx(alone, rel=1e-3, abs=1e-7)
    before = eng.counters.total()
    again = eng.score_many(requests)  # prefixes cached now: one forward of the suffix rows
    after = eng.counters.total()
    assert after.forward_passes - before.forward_passes == 1
    assert after.tokens - before.tokens == 6 * 4  # six rows right-padded to the longest suffix
    assert all(a == pytest.approx(b, rel=1e-4) for a, b in zip(again, got))


def test_contexts_sharing_a_long_prefix_encode_it_once(tiny, tokenizer, ctx):
    """A cold cache and many contexts with a long common part (the evaluation template, a system
    prompt): the shared part is encoded once, not once per row, and everything stays exact."""
    _, model = tiny
    head = (ctx * 4)[:40]
    contexts = [head + [100 + i, 7, 8 + i] for i in range(6)] + [head[:30] + [55, 56], [3, 4, 5]]
    eng = make(model, tokenizer)
    eng.prefill_many(contexts)
    work = eng.counters.total()
    assert work.tokens < 0.5 * sum(len(c) for c in contexts)  # each row encoding all its tokens: the sum
    assert work.forward_passes == 2  # the shared part (30 tokens here), then every tail
    for c in contexts:
        assert np.abs(eng.next_logits(c) - full_logits(model, c)).max() < TOL
    assert eng.counters.total().tokens == work.tokens  # all of them cached


def test_fused_scoring_equals_two_forwards(tiny, tokenizer, ctx):
    """The GPU form of score_many (one forward, option rows repeat their prompt's uncached tail)
    gives the same probabilities as the CPU form (tails first, then the option rows) and stores
    the tails: scoring again runs only the option rows."""
    _, model = tiny
    requests = [(ctx, [[11, 12, 13, 14], [15, 16]], [32, 33]), (ctx[:4] + [50, 51], [[11, 12], [15]], [40, 41]),
                (ctx * 2, [[7], [8, 9, 10]], [32, 33])]
    two, one = make(model, tokenizer), make(model, tokenizer)
    one.fuse_scoring = True
    for eng in (two, one):
        eng.next_logits(ctx[:6])
    base = [eng.counters.total().forward_passes for eng in (two, one)]
    expected, got = two.score_many(requests), one.score_many(requests)
    assert two.counters.total().forward_passes - base[0] == 2
    assert one.counters.total().forward_passes - base[1] == 1
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-7)
    for prefix, _, _ in requests:  # the tails went to the prefix tree, exactly
        assert np.abs(one.next_logits(prefix) - full_logits(model, prefix)).max() < TOL
    before = one.counters.total()
    again = one.score_many(requests)
    assert one.counters.total().tokens - before.tokens == 6 * 4  # only the option rows
    assert all(a == pytest.approx(b, rel=1e-4) for a, b in zip(again, got))


def test_stream_rows_joining_late_decode_as_alone(tiny, tokenizer, ctx):
    """Requests that join a running DecodeStream at different steps get the tokens and
    log-probabilities they get alone; each returns at the step its own rows are done, not when
    the longest row of the batch is; what the stream stored in the prefix tree is exact."""
    _, model = tiny
    eng = make(model, tokenizer)
    eng.stop_ids = frozenset()
    eng.next_logits(ctx)
    eng.next_logits(ctx[:5])
    plan = {  # key: (joins at step, context, rows)
        "long": (0, ctx, [Row(12, 1.0, 15, greedy=True), Row(12, 1.0, 15)]),
        "short": (1, ctx[:5], [Row(2, 1.0, 15), Row(3, 2.0, 0)]),
        "tail": (2, ctx + [17], [Row(4, 1.0, 15), Row(4, 1.0, 15)]),  # last token uncached
        "fresh": (3, [3, 9, 4, 4, 8], [Row(3, 1.0, 0)]),  # nothing cached
    }
    rng = np.random.default_rng(5)
    uniforms = {k: rng.random((len(rows), 12)) for k, (_, _, rows) in plan.items()}
    stream = eng.stream()
    done_at, got = {}, {}
    for step in range(30):
        for key, (at, context, rows) in plan.items():
            if at == step:
                stream.join(key, context, rows, uniforms[key])
        for key, samples in stream.step().items():
            done_at[key], got[key] = step, samples
        if not stream and step > 3:
            break
    assert done_at["short"] < done_at["long"] and done_at["fresh"] < done_at["long"]
    assert done_at["short"] == 1 + 3 - 1  # its longest row's last token is picked at its third step
    assert done_at["tail"] == 2 + 4  # one step feeds the uncached last token, then four picks
    for key, (_, context, rows) in plan.items():
        alone = make(model, tokenizer)
        alone.stop_ids = frozenset()
        expected = alone.decode_rows(context, rows, uniforms[key])
        assert [s.tokens for s in got[key]] == [s.tokens for s in expected], key
        assert [s.logprob for s in got[key]] == pytest.approx([s.logprob for s in expected], abs=1e-4)
        for s in got[key]:
            ids = context + s.tokens[:-1]
            assert np.abs(eng.next_logits(ids) - full_logits(model, ids)).max() < TOL


def test_stream_cancel_drops_only_that_request(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    eng.stop_ids = frozenset()
    u = np.random.default_rng(1).random((2, 8))
    stream = eng.stream()
    stream.join("a", ctx, [Row(8, 1.0, 15), Row(8, 1.0, 15)], u)
    stream.join("b", ctx[:6], [Row(8, 1.0, 15), Row(8, 1.0, 15)], u)
    stream.step()
    stream.cancel("a")
    out = {}
    while stream:
        out.update(stream.step())
    assert list(out) == ["b"]
    assert stream.cache is None  # nothing left in the buffer
    alone = make(model, tokenizer).decode_rows(ctx[:6], [Row(8, 1.0, 15)] * 2, u)
    assert [s.tokens for s in out["b"]] == [s.tokens for s in alone]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 15), (2.0, 5), (0.7, 0)])
def test_sampling_follows_the_warped_distribution(temperature, top_k):
    """Inverse-CDF sampling on an even grid of uniforms reproduces the temperature + top-k
    distribution; greedy rows take the argmax; log probabilities are the warped ones."""
    from rain_llm.engine.hf.engine import _sample

    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 3
    scaled = logits[0] / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1], float("-inf"))
    expected = torch.softmax(scaled.double(), -1)
    grid = 20000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    tokens, logprob = _sample(logits.expand(grid, -1), temperature, top_k, u, torch.zeros(grid, dtype=torch.bool))
    freq = torch.bincount(tokens, minlength=300).double() / grid
    assert (freq - expected).abs().max() < 2 / grid + 1e-9
    assert torch.allclose(logprob, expected.log()[tokens], atol=1e-5)
    greedy, lp = _sample(logits, temperature, top_k, torch.tensor([0.99]), torch.tensor([True]))
    assert greedy.item() == int(logits.argmax()) and lp.item() == pytest.approx(float(expected.max().log()), abs=1e-6)


def test_rows_with_the_same_tokens_are_computed_once(tiny, tokenizer, ctx):
    """Identical rows (here three greedy rows, and sampled rows under equal uniforms) share one
    batch slot: the decode processes the tokens of one row, and each row gets the same answer."""
    _, model = tiny
    one = make(model, tokenizer)
    alone = one.decode_rows(ctx, [Row(6, 1.0, 0, greedy=True)])[0]
    fed_alone = one.counters.total().tokens
    many = make(model, tokenizer)
    u = np.random.default_rng(3).random((1, 6)).repeat(2, axis=0)
    rows = [Row(6, 1.0, 0, greedy=True)] * 3 + [Row(6, 1.0, 15)] * 2
    out = many.decode_rows(ctx, rows, np.vstack([np.full((3, 6), 0.5), u]))
    assert [s.tokens for s in out[:3]] == [alone.tokens] * 3
    assert out[3].tokens == out[4].tokens
    diverge = next((i for i, (a, b) in enumerate(zip(alone.tokens, out[3].tokens)) if a != b), len(alone.tokens))
    # prefill once, then the greedy path once and the sampled path once (shared with greedy until they differ)
    fed_sampled = len(out[3].tokens) - 1 - min(diverge, len(out[3].tokens) - 1)
    assert many.counters.total().tokens == fed_alone + fed_sampled
