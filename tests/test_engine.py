"""The transformers engine on tiny random models: every reuse path equals a full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rain_llm.engine.hf.engine import HFEngine
from rain_llm.engine.hf.stream import DecodeStream
from rain_llm.runtime.accounting import PhaseCount, Receipt
from rain_llm.runtime.backend import Row, Score, TextStop
from rain_llm.runtime.text import Codec

TOL = 1e-4


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].float().numpy()


class Eng:
    """A test handle on an `HFEngine` (the transformers backend's private engine): the calls the
    backend makes, with one receipt (`work`) booking everything, so tests can count it."""

    def __init__(self, model, tokenizer, reuse=True, seed=0):
        self.engine = HFEngine(model, Codec(tokenizer, [tokenizer.eos_token_id]), reuse_cache=reuse, seed=seed)
        self.receipt = Receipt("test")
        self.prefix_cache = self.engine.prefix_cache

    @property
    def work(self) -> PhaseCount:
        return PhaseCount(0, set(self.receipt.forwards), self.receipt.tokens)

    def next_logits(self, ctx):
        return self.engine.prefill(ctx, self.receipt)[1].cpu().numpy()

    def decode_groups(self, requests, receipts=None):
        stream = DecodeStream(self.engine)
        for i, (context, rows, uniforms) in enumerate(requests):
            stream.join(i, context, rows, uniforms, receipts[i] if receipts else self.receipt)
        done = {}
        while stream:
            done.update(stream.step())
        return [done[i].samples() for i in range(len(requests))]

    def decode_rows(self, ctx, rows, uniforms=None):
        return self.decode_groups([(ctx, rows, uniforms)])[0]

    def sample(self, ctx, rows, length, *, temperature, top_k, greedy_first, uniforms=None):
        specs = [Row(length, temperature, top_k, greedy=greedy_first and i == 0) for i in range(rows)]
        return self.decode_rows(ctx, specs, uniforms)

    def generate(self, ctx, n):
        return self.decode_rows(ctx, [Row(n, 1.0, 0, greedy=True)])[0].tokens

    def score_options(self, prefix, suffixes, options):
        return self.engine.score_one(Score(None, "evaluate", list(prefix), suffixes, tuple(options)), self.receipt)

    def score_many(self, requests):
        scores = [Score(None, "evaluate", list(p), s, tuple(o)) for p, s, o in requests]
        return self.engine.score_many(scores, [self.receipt] * len(scores))

    def retain(self, prefixes, exact=False):
        self.engine.retain("test", prefixes, exact=exact)


def make(model, tokenizer, reuse=True, seed=0) -> Eng:
    return Eng(model, tokenizer, reuse, seed)


@pytest.fixture
def ctx(tokenizer):
    return tokenizer("The quick brown fox jumps over the lazy dog, and then")["input_ids"]


def test_prefill_and_every_reuse_path_match_full_forward(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    # fresh context
    assert np.abs(eng.next_logits(ctx) - full_logits(model, ctx)).max() < TOL
    # the same context again: served from the cache, no forward pass
    passes = eng.work.forward_passes
    assert np.abs(eng.next_logits(ctx) - full_logits(model, ctx)).max() < TOL
    assert eng.work.forward_passes == passes
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
        before = eng.work.tokens
        eng.next_logits(ids + [5])
        assert eng.work.tokens - before == 1


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
    assert on.work.tokens == len(ctx) + 2 + 1
    assert off.work.tokens == len(ctx) + (len(ctx) + 2) + (len(ctx) + 3)


def test_receipts_add_up_per_request(tiny, tokenizer, ctx):
    """Each forward charges every row's receipt its positions: a prefill of one row, then a decode
    of three rows (one forward per fed token) charged to another request."""
    _, model = tiny
    eng = make(model, tokenizer)
    prefill, expand = Receipt("prefill"), Receipt("expand")
    eng.engine.prefill(ctx, prefill)
    stream = DecodeStream(eng.engine)
    stream.join("x", ctx, [Row(4, 1.0, 15, greedy=i == 0) for i in range(3)], None, expand)
    while stream:
        stream.step()
    assert prefill.tokens == len(ctx) and len(prefill.forwards) == 1
    steps = len(expand.forwards)
    assert 1 <= steps <= 3  # 4 tokens: 3 fed (unless every row ended early)
    assert expand.tokens == 3 * steps or expand.tokens < 3 * steps  # rows that share a slot are fed once
    assert not prefill.forwards & expand.forwards

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
    uniforms = np.random.default_rng(1).random((3, 8))
    free = make(model, tokenizer).decode_rows(ctx, [Row(8, 1.0, 0)], uniforms[2:])[0].tokens
    marker = tokenizer.decode(free[:3])  # a text stop rule that first holds after the third token
    assert marker and marker not in tokenizer.decode(free[:2])
    rows = [Row(5, 2.0, 15, greedy=True), Row(5, 2.0, 15), Row(8, 1.0, 0, stop=TextStop(markers=(marker,)))]
    eng = make(model, tokenizer)
    batch = eng.decode_rows(ctx, rows, uniforms)
    assert [len(s.tokens) for s in batch][:2] == [5, 5] or any(t == tokenizer.eos_token_id for t in batch[0].tokens)
    assert batch[2].tokens == free[:3]  # its own stop rule
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
    before = eng.work.tokens
    eng.score_options(prefix, suffixes, [32, 33])  # now cached: only the suffix rows run
    assert eng.work.tokens - before == 2 * 2


def test_least_work_counts_each_distinct_position_once(tiny, tokenizer, ctx):
    """Least work is counted at the edge, from what requests asked for: the same whatever the
    engine does; tokens processed show the waste (none with reuse, whole contexts without)."""
    from rain_llm.engine.hf.backend import HFBackend
    from rain_llm.runtime.accounting import Compute
    from rain_llm.runtime.backend import TopTokens
    from rain_llm.runtime.scheduler import run_requests

    _, model = tiny
    work = {}
    for reuse in (True, False):
        backend = HFBackend(make(model, tokenizer, reuse=reuse).engine, "tiny")
        compute = Compute()
        for context in (ctx, ctx, ctx + [5, 6]):
            run_requests(backend, [TopTokens("a", "expand", context, 3)], compute)
        work[reuse] = compute
    assert work[True].least_work == work[False].least_work == len(ctx) + 2
    assert work[True].total().tokens == len(ctx) + 2  # with reuse: no waste
    assert work[False].total().tokens == 3 * len(ctx) + 2
    assert work[True].to_dict()["least_work"]["tokens"] == len(ctx) + 2
    backend = HFBackend(make(model, tokenizer).engine, "tiny")
    compute = Compute()
    run_requests(backend, [Score("a", "evaluate", ctx, [[7, 8], [9]], (32, 33))], compute)
    assert compute.least_work == len(ctx) + 3

def test_groups_of_different_contexts_decode_as_alone(tiny, tokenizer, ctx):
    """Several contexts in one left-padded batch give each row the tokens and log-probabilities
    it gets alone (same uniforms), and leave a prefix tree that is still exact."""
    _, model = tiny
    contexts = [ctx, ctx[:5], ctx + [17, 18, 19, 20, 21], [3, 9] + ctx[2:8]]
    rows = [[Row(5, 1.0, 15, greedy=True), Row(5, 1.0, 15)], [Row(3, 2.0, 0)],
            [Row(6, 1.0, 15), Row(2, 1.0, 15), Row(6, 1.0, 0, stop=TextStop(chars=",."))], [Row(4, 1.0, 15)]]
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


def test_groups_charge_each_request_its_rows(tiny, tokenizer, ctx):
    _, model = tiny
    eng = make(model, tokenizer)
    a, b = Receipt("expand"), Receipt("expand")
    eng.decode_groups([(ctx, [Row(3, 1.0, 0)] * 2, None), (ctx[:4], [Row(3, 1.0, 0)], None)], receipts=[a, b])
    assert a.tokens > b.tokens > 0
    assert a.forwards & b.forwards  # they shared forwards

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
    before = eng.work
    again = eng.score_many(requests)  # prefixes cached now: one forward of the suffix rows
    after = eng.work
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
    eng.engine.encode_many(contexts, [eng.receipt] * len(contexts))
    work = eng.work
    assert work.tokens < 0.5 * sum(len(c) for c in contexts)  # each row encoding all its tokens: the sum
    assert work.forward_passes == 2  # the shared part (30 tokens here), then every tail
    for c in contexts:
        assert np.abs(eng.next_logits(c) - full_logits(model, c)).max() < TOL
    assert eng.work.tokens == work.tokens  # all of them cached


def test_fused_scoring_equals_two_forwards(tiny, tokenizer, ctx):
    """The GPU form of score_many (one forward, option rows repeat their prompt's uncached tail)
    gives the same probabilities as the CPU form (tails first, then the option rows) and stores
    the tails: scoring again runs only the option rows."""
    _, model = tiny
    requests = [(ctx, [[11, 12, 13, 14], [15, 16]], [32, 33]), (ctx[:4] + [50, 51], [[11, 12], [15]], [40, 41]),
                (ctx * 2, [[7], [8, 9, 10]], [32, 33])]
    two, one = make(model, tokenizer), make(model, tokenizer)
    one.engine.fuse_scoring = True
    for eng in (two, one):
        eng.next_logits(ctx[:6])
    base = [eng.work.forward_passes for eng in (two, one)]
    expected, got = two.score_many(requests), one.score_many(requests)
    assert two.work.forward_passes - base[0] == 2
    assert one.work.forward_passes - base[1] == 1
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-7)
    for prefix, _, _ in requests:  # the tails went to the prefix tree, exactly
        assert np.abs(one.next_logits(prefix) - full_logits(model, prefix)).max() < TOL
    before = one.work
    again = one.score_many(requests)
    assert one.work.tokens - before.tokens == 6 * 4  # only the option rows
    assert all(a == pytest.approx(b, rel=1e-4) for a, b in zip(again, got))


def test_stream_rows_joining_late_decode_as_alone(tiny, tokenizer, ctx):
    """Requests that join a running DecodeStream at different steps get the tokens and
    log-probabilities they get alone; each returns at the step its own rows are done, not when
    the longest row of the batch is; what the stream stored in the prefix tree is exact."""
    _, model = tiny
    eng = make(model, tokenizer)
    eng.engine.codec.stop_ids = frozenset()
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
    stream = DecodeStream(eng.engine)
    done_at, got = {}, {}
    for step in range(30):
        for key, (at, context, rows) in plan.items():
            if at == step:
                stream.join(key, context, rows, uniforms[key], eng.receipt)
        for key, request in stream.step().items():
            done_at[key], got[key] = step, request.samples()
        if not stream and step > 3:
            break
    assert done_at["short"] < done_at["long"] and done_at["fresh"] < done_at["long"]
    assert done_at["short"] == 1 + 3 - 1  # its longest row's last token is picked at its third step
    assert done_at["tail"] == 2 + 4  # one step feeds the uncached last token, then four picks
    for key, (_, context, rows) in plan.items():
        alone = make(model, tokenizer)
        alone.engine.codec.stop_ids = frozenset()
        expected = alone.decode_rows(context, rows, uniforms[key])
        assert [s.tokens for s in got[key]] == [s.tokens for s in expected], key
        assert [s.logprob for s in got[key]] == pytest.approx([s.logprob for s in expected], abs=1e-4)
        for s in got[key]:
            ids = context + s.tokens[:-1]
            assert np.abs(eng.next_logits(ids) - full_logits(model, ids)).max() < TOL


@pytest.mark.parametrize("speculate", [0, 6])
def test_stream_cancel_drops_only_that_request(tiny, tokenizer, ctx, speculate):
    """A request cancelled mid-decode (with speculation: after a forward that verified drafts for
    both requests) leaves the other's tokens as they are alone."""
    _, model = tiny
    eng = make(model, tokenizer)
    eng.engine.codec.stop_ids = frozenset()
    eng.engine.speculate = speculate
    u = np.random.default_rng(1).random((2, 8))
    eng.decode_groups([(ctx, [Row(8, 1.0, 15)], u[:1]), (ctx[:6], [Row(8, 1.0, 15)], u[1:])])  # drafts for both
    stream, work = DecodeStream(eng.engine), Receipt("stream")
    stream.join("a", ctx, [Row(8, 1.0, 15), Row(8, 1.0, 15)], u, work)
    stream.join("b", ctx[:6], [Row(8, 1.0, 15), Row(8, 1.0, 15)], u, work)
    stream.step()
    assert (work.drafted > 0) == (speculate > 0)
    stream.cancel("a")
    out = {}
    while stream:
        out.update({k: r.samples() for k, r in stream.step().items()})
    assert list(out) == ["b"]
    assert stream.cache is None  # nothing left in the buffer
    alone = make(model, tokenizer).decode_rows(ctx[:6], [Row(8, 1.0, 15)] * 2, u)
    assert [s.tokens for s in out["b"]] == [s.tokens for s in alone]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 15), (2.0, 5), (0.7, 0)])
def test_sampling_follows_the_warped_distribution(temperature, top_k):
    """Gumbel-max sampling keyed by the rows' uniforms (here an even grid: each a different seed)
    reproduces the temperature + top-k distribution (within five standard errors per token); the
    same uniform gives the same token; greedy rows take the argmax; log probabilities are the
    warped ones."""
    from rain_llm.engine.hf.stream import sample as _sample

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
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / grid).sqrt() + 1 / grid).all()
    again, _ = _sample(logits.expand(50, -1), temperature, top_k, u[:50].flip(0), torch.zeros(50, dtype=torch.bool))
    assert again.tolist() == tokens[:50].flip(0).tolist()  # a row's token depends on its own uniform only
    assert torch.allclose(logprob, expected.log()[tokens], atol=1e-5)
    greedy, lp = _sample(logits, temperature, top_k, torch.tensor([0.99]), torch.tensor([True]))
    assert greedy.item() == int(logits.argmax()) and lp.item() == pytest.approx(float(expected.max().log()), abs=1e-6)


def test_rows_with_the_same_tokens_are_computed_once(tiny, tokenizer, ctx):
    """Identical rows (here three greedy rows, and sampled rows under equal uniforms) share one
    batch slot: the decode processes the tokens of one row, and each row gets the same answer."""
    _, model = tiny
    one = make(model, tokenizer)
    alone = one.decode_rows(ctx, [Row(6, 1.0, 0, greedy=True)])[0]
    fed_alone = one.work.tokens
    many = make(model, tokenizer)
    u = np.random.default_rng(3).random((1, 6)).repeat(2, axis=0)
    rows = [Row(6, 1.0, 0, greedy=True)] * 3 + [Row(6, 1.0, 15)] * 2
    out = many.decode_rows(ctx, rows, np.vstack([np.full((3, 6), 0.5), u]))
    assert [s.tokens for s in out[:3]] == [alone.tokens] * 3
    assert out[3].tokens == out[4].tokens
    diverge = next((i for i, (a, b) in enumerate(zip(alone.tokens, out[3].tokens)) if a != b), len(alone.tokens))
    # prefill once, then the greedy path once and the sampled path once (shared with greedy until they differ)
    fed_sampled = len(out[3].tokens) - 1 - min(diverge, len(out[3].tokens) - 1)
    assert many.work.tokens == fed_alone + fed_sampled


def test_prefix_cache_continuation_follows_what_was_run_after_the_tokens():
    from rain_llm.engine.hf.cache import Chunk, PrefixCache

    tree = PrefixCache()
    a = Chunk((1, 2, 3), None, None)
    tree.root.add(a)
    a.add(Chunk((4, 5), None, None))
    a.add(Chunk((6, 7, 8, 9), None, None))  # the longer branch is followed
    assert tree.continuation([1, 2, 3], 10) == [6, 7, 8, 9]
    assert tree.continuation([1, 2], 10) == [3, 6, 7, 8, 9]  # from inside a chunk
    assert tree.continuation([1, 2, 3, 4], 10) == [5]
    assert tree.continuation([1, 2, 3, 6, 7], 1) == [8]  # at most `limit`
    assert tree.continuation([1, 2, 3, 4, 5], 10) == []  # nothing ran after them
    assert tree.continuation([1, 3], 10) == [] and tree.continuation([9], 10) == []
    assert [len(c.tokens) for c in tree.root.children[1]] == [3]  # nothing was split


def test_speculation_decodes_the_tokens_of_one_token_per_forward(tiny, tokenizer, ctx):
    """Rows verifying drafts from the prefix tree (speculate on) get the tokens and log-probabilities
    of one token per forward: drafts accepted whole, in part (rows of one slot accepting different
    lengths), rejected at once, started inside a stored chunk, and joining a running stream; in fewer
    forwards; and what they store in the prefix tree is exact."""
    _, model = tiny
    rng = np.random.default_rng(11)
    first = rng.random((3, 10))
    again = rng.random((5, 10))
    again[0] = first[0]  # the same row: its draft is accepted whole
    again[1, :3] = first[1, :3]  # the same first three tokens, then (likely) another path
    again[2, :2] = first[0, :2]  # shares a slot with row 0 for two tokens, then leaves it
    rows = [Row(10, 1.0, 15) for _ in range(3)]

    def run(speculate):
        eng = make(model, tokenizer)
        eng.engine.codec.stop_ids = frozenset()
        eng.engine.speculate = speculate
        eng.next_logits(ctx)
        stored = eng.decode_rows(ctx, rows, first)  # what later drafts come from
        stream, work = DecodeStream(eng.engine), Receipt("stream")  # `work`: the verifying stream's receipt
        stream.join("again", ctx, [Row(10, 1.0, 15) for _ in range(4)] + [Row(10, 1.0, 15, greedy=True)], again, work)
        stream.join("whole", ctx, [Row(10, 1.0, 15)], first[:1], work)  # a stored row again, alone
        got, done_at = {}, {}
        for step in range(40):
            if step == 2:  # joins inside a stored row's chunk: its last token uncached, its draft from the chunk
                stream.join("inside", ctx + stored[0].tokens[:4], [Row(6, 1.0, 15)], first[0:1, 4:], work)
            for key, request in stream.step().items():
                got[key], done_at[key] = request.samples(), step
            if not stream and step > 2:
                break
        return eng, stored, got, work, done_at

    _, _, expected, off_work, off_done_at = run(0)
    on, stored, got, work, done_at = run(6)
    assert got.keys() == expected.keys() == {"again", "inside", "whole"}
    for key in got:
        assert [s.tokens for s in got[key]] == [s.tokens for s in expected[key]], key
        assert [s.logprob for s in got[key]] == pytest.approx([s.logprob for s in expected[key]], abs=1e-4)
    assert got["again"][0].tokens == stored[0].tokens and got["inside"][0].tokens == stored[0].tokens[4:]
    assert got["again"][1].tokens[:3] == stored[1].tokens[:3] and got["again"][2].tokens[:2] == stored[0].tokens[:2]
    assert 0 < work.accepted < work.drafted  # some drafts were accepted, some rejected
    assert off_work.drafted == 0
    assert work.tokens - work.speculated == off_work.tokens  # what one token per forward runs
    assert got["whole"][0].tokens == stored[0].tokens
    assert off_done_at["whole"] == 9 and done_at["whole"] == 2  # ten picks: 1 + 6 per forward + 3
    assert done_at["inside"] < off_done_at["inside"]
    for s in got["again"] + got["inside"]:
        context = ctx if s in got["again"] else ctx + stored[0].tokens[:4]
        ids = context + s.tokens[:-1]
        assert np.abs(on.next_logits(ids) - full_logits(model, ids)).max() < TOL


def test_recent_drafts_what_followed_the_last_three_tokens():
    from rain_llm.engine.hf.stream import _Recent

    recent = _Recent(n=3, size=8)
    recent.add([1, 2, 3, 4, 5, 6])
    assert recent.draft([9, 2, 3, 4], 2) == [5, 6]  # the last three tokens matched anywhere
    assert recent.draft([3, 4, 5, 6], 4) == [] and recent.draft([4, 5], 4) == []
    recent.add([7, 2, 3, 4, 8])
    assert recent.draft([2, 3, 4], 4) == [8]  # the latest wins
    recent.add(list(range(100, 120)))  # over `size` runs: what came before goes
    recent.add([0])
    assert recent.draft([2, 3, 4], 4) == [] and len(recent.after) <= 17


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer):
    """A tiny random GPT-2: learned position embeddings, none past its window of 96."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def test_a_row_at_the_window_while_another_slot_speculates(tiny_gpt2, tokenizer):
    """A slot feeding a draft widens every slot's forward; the columns of a row that ends at the model's
    window then lie past it (padding): they must not break a model with learned positions, and the
    tokens stay those of one token per forward."""

    def run(speculate):
        engine = HFEngine(tiny_gpt2, Codec(tokenizer), speculate=speculate)
        engine.codec.stop_ids = frozenset()
        stream = DecodeStream(engine)
        stream.recent.draft = lambda tokens, limit: [5] * limit  # a draft for every slot (rejected)
        u = np.random.default_rng(0).random((2, 20))
        stream.join("edge", list(range(100, 192)), [Row(4, 1.0, 0)], u[:1, :4], Receipt("edge"))  # ends at 95
        stream.join("short", list(range(200, 210)), [Row(20, 1.0, 0)], u[1:], Receipt("short"))
        done = {}
        while stream:
            done.update(stream.step())
        return {key: [s.tokens for s in request.samples()] for key, request in done.items()}

    assert run(8) == run(0)


def test_rollouts_stop_at_the_window(tiny_gpt2, tokenizer, embedder):
    """A rollout past the answer budget stops at the model's window (a value that is not the model's
    own sets no bound of its own on it), with speculation on and off."""
    from rain_llm import Rain, load_config

    prompt = "lock " * 20
    answers = []
    for speculate in (0, 4):
        rain = Rain(tiny_gpt2, tokenizer, embedder=embedder, name="gpt2", speculate=speculate)
        context = len(rain.prepare(prompt, load_config("fast", max_new_tokens=1))[1])
        cfg = load_config("fast", value="vader", max_new_tokens=96 - context, t_max=3, max_rollout_tokens=32,
                          rollout_temperature=0, rollout_stop_chars="\u2603")  # nothing ends a rollout early
        answers.append(rain.generate(prompt, cfg).token_ids)
    assert answers[0] == answers[1] and len(answers[0]) > 0


ARCHITECTURES = {  # position schemes the Llama-like fixtures do not cover
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_positions=512, n_embd=64, n_layer=2, n_head=4)),  # learned
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2,  # learned, offset
                                                num_attention_heads=4, max_position_embeddings=512,
                                                word_embed_proj_dim=64)),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),  # ALiBi
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128,  # partial rotary
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=512)),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_rain_on_other_position_schemes(arch, tokenizer, embedder):
    """RAIN on models with learned, offset, ALiBi and partial-rotary positions: an answer in a batch
    (left padding) equals it alone, and speculation changes no answer."""
    import transformers

    from rain_llm import Rain, load_config

    model_class, config_class, shape = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **shape)
    model = getattr(transformers, model_class)(config).eval()
    cfg = load_config("fast", max_new_tokens=6, t_max=2, max_rollout_tokens=4, rollout_temperature=0)
    prompts = ["How do I pick a lock?", "Hi there, tell me a long story about dragons"]
    answers = []
    for speculate in (0, 4):
        rain = Rain(model, tokenizer, embedder=embedder, name=arch, speculate=speculate)
        batch = [out.token_ids for out in rain.generate_many(prompts, cfg)]
        assert batch[1] == rain.generate(prompts[1], cfg).token_ids
        answers.append(batch)
    assert answers[0] == answers[1] and all(answers[0])
