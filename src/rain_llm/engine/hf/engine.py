"""The transformers backend: one causal LM, a prefix cache of KV chunks, batched sampling.

Why a prefix cache: every call of the search shares a long prefix with an earlier one (the
prompt, the committed answer, the path to the leaf; the self-evaluation template and the
conversation). `PrefixCache` is a radix tree of token chunks, each holding the keys/values of
its tokens and the next-token logits after its last token. A call finds the longest cached
prefix of its context, runs only the tokens after it, and stores what it computed. Attention
keys/values of a prefix do not depend on what follows, so slices of chunks are valid caches.

Decoding runs in preallocated buffers (`_BufferLayer`): appending a token writes in place
instead of concatenating the whole cache each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rain_llm.engine.base import Counters, Row, Sample, split
from rain_llm.errors import RainError

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape [batch, heads, len, dim]


class _Chunk:
    """A run of tokens in the prefix tree, with its KV (batch 1) and the logits after it."""

    __slots__ = ("tokens", "kv", "logits", "children")

    def __init__(self, tokens: tuple[int, ...], kv: KV | None, logits: torch.Tensor | None):
        self.tokens = tokens
        self.kv = kv
        self.logits = logits
        self.children: dict[int, list[_Chunk]] = {}

    def add(self, child: _Chunk) -> None:
        self.children.setdefault(child.tokens[0], []).append(child)

    def split(self, m: int) -> None:
        """Keep the first m tokens here; move the rest (and the children) to a new child."""
        assert self.kv is not None and 0 < m < len(self.tokens)
        tail = _Chunk(self.tokens[m:], [(k[:, :, m:], v[:, :, m:]) for k, v in self.kv], self.logits)
        tail.children = self.children
        self.tokens = self.tokens[:m]
        self.kv = [(k[:, :, :m], v[:, :, :m]) for k, v in self.kv]
        self.logits = None
        self.children = {}
        self.add(tail)


class PrefixCache:
    """Radix tree of `_Chunk`s rooted at the empty context."""

    def __init__(self) -> None:
        self.root = _Chunk((), None, None)

    def lookup(self, context: Sequence[int]) -> tuple[list[_Chunk], _Chunk, int, torch.Tensor | None]:
        """Longest cached prefix of `context`, leaving at least one token to run unless the
        logits after the whole context are cached.

        Returns (chunks along the prefix, the chunk to attach new work to, prefix length,
        cached next-token logits if the whole context is cached)."""
        node, pos, path = self.root, 0, []
        while pos < len(context):
            best, best_m = None, 0
            for c in node.children.get(context[pos], ()):
                m = _common(c.tokens, context, pos)
                full = m == len(c.tokens)
                if m > best_m or (m == best_m and full and c.logits is not None):
                    best, best_m = c, m
            if best is None:
                break
            if best_m < len(best.tokens):  # partial: split so that chunks along the path are whole
                if pos + best_m == len(context):
                    best_m -= 1  # leave the last token to run: its logits are not stored
                if best_m == 0:
                    break
                best.split(best_m)
            path.append(best)
            pos += best_m
            node = best
        if pos == len(context) and path:
            if node.logits is not None:
                return path, node, pos, node.logits
            # the whole context is cached but not its logits: run the last token again
            last = path[-1]
            if len(last.tokens) == 1:
                path.pop()
                node = path[-1] if path else self.root
            else:
                last.split(len(last.tokens) - 1)
            pos -= 1
        return path, node, pos, None

    def retain(self, prefixes: Sequence[Sequence[int]], exact: Sequence[Sequence[int]] = ()) -> None:
        """Drop every branch that is compatible with none of `prefixes` (a prefix keeps all that
        extends it) and none of `exact` (kept themselves, not what extends them)."""

        def compatible(tokens: tuple[int, ...], offset: int, prefix: Sequence[int]) -> bool:
            overlap = prefix[offset:offset + len(tokens)]
            return tuple(overlap) == tokens[:len(overlap)]

        def walk(node: _Chunk, offset: int, alive: list[tuple[Sequence[int], bool]]) -> None:
            for key in list(node.children):
                kept = []
                for c in node.children[key]:
                    live = [(p, e) for p, e in alive if (not e or offset < len(p)) and compatible(c.tokens, offset, p)]
                    if live:
                        kept.append(c)
                        walk(c, offset + len(c.tokens), live)
                if kept:
                    node.children[key] = kept
                else:
                    del node.children[key]

        walk(self.root, 0, [(p, False) for p in prefixes] + [(p, True) for p in exact])

    def clear(self) -> None:
        self.root = _Chunk((), None, None)

    def num_tokens(self) -> int:
        """Token positions held (for memory tests)."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.tokens)
            stack.extend(c for cs in node.children.values() for c in cs)
        return total


def _shared_prefixes(contexts: list[tuple[list[int], int]], min_saving: int) -> list[list[int]]:
    """Prefixes that several contexts (each with its cached length) share past what is cached,
    worth encoding once first: encoding them once saves (sharers - 1) x uncached length tokens, at
    least `min_saving`. Shortest ones only (a longer run shared by some of them stays in their
    tails), each shorter than the contexts that share it."""
    ordered = sorted(contexts, key=lambda c: c[0])
    found: dict[tuple[int, ...], int] = {}  # shared prefix -> its uncached length
    for (a, pa), (b, pb) in zip(ordered, ordered[1:]):
        n = min(_common(tuple(a), b, 0), len(a) - 1, len(b) - 1)  # leave each context a token of its own
        if n > max(pa, pb):
            found[tuple(a[:n])] = n - max(pa, pb)
    out = []
    for p, uncached in sorted(found.items()):
        if any(len(q) < len(p) and p[:len(q)] == q for q in found):
            continue
        sharers = sum(tuple(c[:len(p)]) == p for c, _ in contexts)
        if (sharers - 1) * uncached >= min_saving:
            out.append(list(p))
    return out


def _common(tokens: tuple[int, ...], context: Sequence[int], pos: int) -> int:
    m, limit = 0, min(len(tokens), len(context) - pos)
    while m < limit and tokens[m] == context[pos + m]:
        m += 1
    return m


class _BufferLayer(DynamicLayer):
    """A cache layer over a preallocated [batch, heads, capacity, dim] buffer: appends in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.kbuf, self.vbuf, self.length = keys, values, length
        self.is_initialized = True
        self.device = keys.device
        self.dtype = keys.dtype
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.kbuf.shape[-2]:
            raise RuntimeError("KV buffer overflow (engine bug: capacity too small)")
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _buffer_cache(segments: list[KV], rows: int, capacity: int) -> DynamicCache | None:
    """A cache of `rows` identical rows holding the concatenated segments, room for `capacity`."""
    return _padded_cache([segments], [rows], capacity)[0] if segments else None


def _concat(segments: list[KV], layer: int, which: int) -> torch.Tensor:
    """One layer's keys (which = 0) or values (1) of consecutive segments, as one tensor."""
    parts = [seg[layer][which] for seg in segments]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _padded_cache(segments: list[list[KV]], rows: list[int], capacity: int) -> tuple[DynamicCache, list[int]]:
    """A cache for several contexts at once: group g's concatenated `segments[g]` fills `rows[g]`
    batch rows, left-padded with zeros so every context ends at the same column. Returns the
    cache and each batch row's padding (masked out by the caller's attention mask). One
    concatenation and one copy per group and layer: few kernel launches however long the path."""
    lengths = [sum(kv[0][0].shape[-2] for kv in segs) for segs in segments]
    width = max(lengths)
    pads = [width - n for n, r in zip(lengths, rows) for _ in range(r)]
    alloc = torch.zeros if any(pads) else torch.empty  # only padding must be finite (it is masked, not skipped)
    first = next(segs[0] for segs in segments if segs)
    layers = []
    for layer in range(len(first)):
        k0, v0 = first[layer]
        kbuf = alloc((len(pads), k0.shape[1], capacity, k0.shape[3]), dtype=k0.dtype, device=k0.device)
        vbuf = alloc((len(pads), v0.shape[1], capacity, v0.shape[3]), dtype=v0.dtype, device=v0.device)
        row = 0
        for segs, n, r in zip(segments, lengths, rows):
            if segs:
                kbuf[row:row + r, :, width - n:width] = _concat(segs, layer, 0)
                vbuf[row:row + r, :, width - n:width] = _concat(segs, layer, 1)
            row += r
        layers.append(_BufferLayer(kbuf, vbuf, width))
    cache = DynamicCache()
    cache.layers = layers
    return cache, pads


def _cache_kv(cache: DynamicCache, start: int, end: int, row: int = 0) -> KV:
    """Copy positions [start, end) of one row out of a cache (for storing in the prefix tree)."""
    return [(layer.keys[row:row + 1, :, start:end].clone(), layer.values[row:row + 1, :, start:end].clone())
            for layer in cache.layers]


def context_window(config: Any) -> int:
    """The model's maximum sequence length, from its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class HFEngine:
    """A transformers causal LM behind the `Engine` interface, with KV reuse across calls."""

    def __init__(self, model: Any, tokenizer: Any, *, reuse_cache: bool = True, seed: int = 0,
                 stop_ids: Sequence[int] = ()):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.reuse_cache = reuse_cache
        self.counters = Counters()
        self.prefix_cache = PrefixCache()
        self._retained: dict[Hashable, list[tuple[list[int], bool]]] = {}  # per owner (answers sharing the engine)
        self.charge_to: Counters | None = None  # also charge work to these counters (one answer of several)
        self.context_window = context_window(model.config)
        self.device = model.get_input_embeddings().weight.device
        self.generator = torch.Generator().manual_seed(seed)
        self.stop_ids = frozenset(stop_ids)
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        # Score a batch of evaluation prompts in one forward (each option row repeats its prompt's
        # uncached tail) rather than two (tails once, then the option rows): on a GPU a forward's
        # fixed cost outweighs the repeated tokens; on a CPU every token costs, so two forwards.
        self.fuse_scoring = self.device.type == "cuda"
        # Contexts of one batch that share a long uncached prefix (a cold cache: the evaluation
        # template, a system prompt) get it encoded once, in a forward of its own, when that saves
        # at least this many tokens: about what a forward's fixed cost is worth here.
        self.min_shared_saving = 1024 if self.device.type == "cuda" else 64

    # ------------------------------------------------------------------ text
    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def phase(self, name: str):
        return self.counters.phase(name)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ model calls
    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, cache: DynamicCache | None, keep: int | list[int] = 1,
                 pads: list[int] | None = None, owners: Sequence[Counters | None] | None = None
                 ) -> tuple[torch.Tensor, DynamicCache]:
        """Run `ids` [rows, n] after `cache`; return float32 logits [rows, kept, vocab] of the last
        `keep` positions, or of the positions listed in `keep`. `pads`: each row's left padding in
        the cache (rows of different contexts), masked out, positions counted after it.
        `owners`: whose work each row is (per-answer counters in a batch of several answers)."""
        if cache is None:
            cache = DynamicCache()
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        index = torch.tensor(keep) if isinstance(keep, list) else None
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = index.to(self.device) if index is not None else keep
        if pads is not None and any(pads):
            past, n = cache.get_seq_length(), ids.shape[1]
            pad = torch.tensor(pads, device=self.device).unsqueeze(1)
            columns = torch.arange(past + n, device=self.device).unsqueeze(0)
            kwargs["attention_mask"] = (columns >= pad).long()
            kwargs["position_ids"] = (columns[:, past:] - pad).clamp(min=0)
        out = self.model(input_ids=ids.to(self.device), **kwargs)
        self.counters.add(ids.shape[0], ids.shape[1])
        if owners is None and self.charge_to is not None:
            owners = [self.charge_to]
        if owners is not None:
            for owner in {id(o): o for o in owners if o is not None}.values():
                owner.add(ids.shape[0] if len(owners) == 1 else sum(o is owner for o in owners), ids.shape[1])
        logits = out.logits
        if not self._logits_to_keep:
            logits = logits[:, index.to(logits.device)] if index is not None else logits[:, -keep:]
        return logits.float(), cache

    def _asked(self, positions: Sequence[int], owner: Counters | None) -> None:
        """Note token positions the caller asked about (least work), for the engine and the owner."""
        self.counters.least.add(positions)
        if owner is not None:
            owner.least.add(positions)

    def _prefill(self, context: Sequence[int], rows: int, extra: int,
                 owner: Counters | None = None) -> tuple[DynamicCache, torch.Tensor, Any]:
        """Encode `context` (reusing cached prefixes) into a cache of `rows` rows with room for
        `extra` more tokens. Returns (cache, next-token logits [vocab], the prefix-tree node
        for `context`, None when reuse is off)."""
        if not context:
            raise RainError("empty context: nothing to condition on")
        owner = owner if owner is not None else self.charge_to
        self._asked(context, owner)
        if self.reuse_cache:
            path, node, pos, logits = self.prefix_cache.lookup(context)
        else:
            path, node, pos, logits = [], None, 0, None
        segments: list[KV] = [c.kv for c in path if c.kv is not None]
        if logits is None:
            feed = list(context[pos:])
            cache = _buffer_cache(segments, 1, len(context) + (extra if rows == 1 else 0))
            out, cache = self._forward(torch.tensor([feed]), cache, owners=[owner])
            logits = out[0, -1]
            computed = _cache_kv(cache, pos, len(context))
            if self.reuse_cache:
                chunk = _Chunk(tuple(feed), computed, logits)
                node.add(chunk)
                node = chunk
            if rows == 1 and segments:  # the buffer already holds everything
                return cache, logits, node
            segments = segments + [computed]
        return _buffer_cache(segments, rows, len(context) + extra), logits, node  # type: ignore[return-value]

    def _store(self, node: Any, leaving: list[tuple[list[int], int, torch.Tensor]], cache: DynamicCache,
               start: int) -> None:
        """Remember what a decode loop computed for rows leaving the batch together: each is
        (tokens fed at `start`, batch slot, logits after them). They fed the same number of
        tokens, so one copy per layer serves them all (each chunk holds a view of it)."""
        if not (self.reuse_cache and node is not None):
            return
        fresh, seen = [], set()
        for tokens, slot, logits in leaving:
            key = tuple(tokens)
            if not tokens or key in seen or any(c.tokens == key for c in node.children.get(tokens[0], ())):
                continue  # nothing fed, or an identical row is stored already
            seen.add(key)
            fresh.append((key, slot, logits))
        if not fresh:
            return
        n = len(fresh[0][0])
        index = torch.tensor([slot for _, slot, _ in fresh], device=cache.layers[0].keys.device)
        block = [(layer.keys[:, :, start:start + n].index_select(0, index),
                  layer.values[:, :, start:start + n].index_select(0, index)) for layer in cache.layers]
        for j, (key, _, logits) in enumerate(fresh):
            node.add(_Chunk(key, [(k[j:j + 1], v[j:j + 1]) for k, v in block], logits.clone()))

    def next_logits(self, context: Sequence[int]) -> np.ndarray:
        _, logits, _ = self._prefill(context, 1, 0)
        return logits.cpu().numpy()

    # ------------------------------------------------------------------ several contexts at once
    def _encode_many(self, contexts: Sequence[Sequence[int]],
                     owners: Sequence[Counters | None] | None = None) -> None:
        """Put every context, with the logits after it, in the prefix tree. The uncached tails of
        all of them run as one batch: cached parts left-padded to end at one column, tails fed
        from there and right-padded (causal rows never see their right padding)."""
        todo: dict[tuple[int, ...], tuple[list[int], list[KV], int, Counters | None]] = {}
        for i, context in enumerate(contexts):
            key = tuple(context)
            if key in todo:
                continue
            path, _, pos, logits = self.prefix_cache.lookup(context)
            if logits is None:  # segments are captured now: later lookups may split these chunks
                todo[key] = (list(context), [c.kv for c in path if c.kv is not None], pos,
                             owners[i] if owners else None)
        if not todo:
            return
        shared = _shared_prefixes([(context, pos) for context, _, pos, _ in todo.values()], self.min_shared_saving)
        if shared:  # encode each long prefix that several contexts share once, not once per row
            first_owner = {tuple(c[:len(p)]): o for c, _, _, o in reversed(list(todo.values())) for p in shared}
            self._encode_many(shared, [first_owner.get(tuple(p)) for p in shared])
            self._encode_many([context for context, _, _, _ in todo.values()],
                              [owner for _, _, _, owner in todo.values()])
            return
        batch = list(todo.values())
        start = max(pos for _, _, pos, _ in batch)  # column where every tail begins
        tails = [context[pos:] for context, _, pos, _ in batch]
        width = max(len(t) for t in tails)
        pads = [start - pos for _, _, pos, _ in batch]
        cache = _padded_cache([segs for _, segs, _, _ in batch], [1] * len(batch), start + width)[0] \
            if start > 0 else None
        ids = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tails])
        ends = [len(t) - 1 for t in tails]
        keep = sorted(set(ends))
        out, cache = self._forward(ids, cache, keep=keep, pads=pads if start > 0 else None,
                                   owners=[t[3] for t in batch])
        for row, (context, _, pos, _) in enumerate(batch):
            self._keep_tail(context, pos, cache, start, row, out[row, keep.index(ends[row])])

    def _keep_tail(self, context: Sequence[int], pos: int, cache: DynamicCache, start: int, row: int,
                   logits: torch.Tensor) -> None:
        """Store in the prefix tree what a batch just computed for `context`: its tokens from `pos`
        sit from column `start` of batch row `row` (earlier tokens before it), `logits` follow its
        last token. Skipped if an identical row of the batch stored it already."""
        _, node, now, cached = self.prefix_cache.lookup(context)
        if cached is None:
            kv = _cache_kv(cache, start + now - pos, start + len(context) - pos, row)
            node.add(_Chunk(tuple(context[now:]), kv, logits.clone()))

    def prefill_many(self, contexts: Sequence[Sequence[int]], owners: Sequence[Counters | None] | None = None) -> None:
        """Cache several contexts (and the logits after each) with one batched forward, so later
        calls on them or their extensions start from the cache. Needs reuse on (else a no-op)."""
        if self.reuse_cache and contexts:
            if any(not context for context in contexts):
                raise RainError("empty context: nothing to condition on")
            self._encode_many(contexts, owners)

    def _gather(self, contexts: Sequence[Sequence[int]], rows: Sequence[int],
                extra: int) -> tuple[DynamicCache, list[int], list[torch.Tensor]]:
        """A left-padded cache with rows[g] rows of context g (all in the prefix tree, see
        `_encode_many`) and room for `extra` more tokens; each row's padding; the logits after
        each context."""
        segments, logits = [], []
        for context in contexts:
            path, _, pos, after = self.prefix_cache.lookup(context)
            if after is None or pos != len(context):
                raise RuntimeError("engine bug: context not cached before gathering")
            segments.append([c.kv for c in path if c.kv is not None])
            logits.append(after)
        cache, pads = _padded_cache(segments, list(rows), max(len(c) for c in contexts) + extra)
        return cache, pads, logits

    # ------------------------------------------------------------------ sampling
    def stream(self) -> DecodeStream:
        """Rows that join and leave between forward passes (see `DecodeStream`)."""
        return DecodeStream(self)

    def decode_rows(self, context: Sequence[int], rows: Sequence[Row],
                    uniforms: np.ndarray | None = None) -> list[Sample]:
        """Decode several rows as one batch over the shared context, each with its own
        sampling rule and stop rule. Row r samples with uniforms[r, step] (inverse CDF), so a
        row gives the same tokens alone or in a batch."""
        return self.decode_groups([(context, rows, uniforms)])[0]

    def decode_groups(self, requests: Sequence[tuple[Sequence[int], Sequence[Row], np.ndarray | None]],
                      owners: Sequence[Counters | None] | None = None) -> list[list[Sample]]:
        """`decode_rows` for several contexts in one batch: each request is (context, rows,
        uniforms or None). `owners[i]` (optional) is also charged request i's work. A
        `DecodeStream` that all requests join at once, stepped until every row is done."""
        if not requests or any(not context for context, _, _ in requests):
            raise RainError("empty context: nothing to condition on")
        stream = DecodeStream(self)
        for i, (context, rows, uniforms) in enumerate(requests):
            stream.join(i, context, rows, uniforms, owners[i] if owners else None)
        done: dict[Hashable, list[Sample]] = {}
        while stream:
            done.update(stream.step())
        return [done[i] for i in range(len(requests))]

    def sample(self, context: Sequence[int], rows: int, length: int, *, temperature: float, top_k: int,
               greedy_first: bool, uniforms: np.ndarray | None = None) -> list[Sample]:
        specs = [Row(length, temperature, top_k, greedy=greedy_first and i == 0) for i in range(rows)]
        return self.decode_rows(context, specs, uniforms)

    def rollout(self, context: Sequence[int], max_tokens: int, *, temperature: float,
                done: Callable[[list[int]], bool]) -> list[int]:
        return self.decode_rows(context, [Row(max_tokens, temperature, 0, done=done)])[0].tokens

    def generate(self, context: Sequence[int], max_tokens: int, *, temperature: float = 0.0) -> list[int]:
        row = Row(max_tokens, 1.0, 0, greedy=True) if temperature <= 0 else Row(max_tokens, temperature, 0)
        return self.decode_rows(context, [row])[0].tokens

    # ------------------------------------------------------------------ scoring
    def score_options(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                      option_ids: Sequence[int], owner: Counters | None = None) -> np.ndarray:
        """One batched forward: each row is the uncached rest of the prefix plus one suffix,
        right-padded (causal attention never looks at the padding). The prefix's KV is stored
        from row 0 so the next evaluation of a longer answer starts from it."""
        if not prefix or not all(suffixes):
            raise RainError("evaluation prompt and its suffixes must not be empty")
        owner = owner if owner is not None else self.charge_to
        if self.reuse_cache:
            path, node, pos, _ = self.prefix_cache.lookup(prefix)
        else:
            path, node, pos = [], None, 0
        for suffix in suffixes:
            self._asked(list(prefix) + list(suffix), owner)
        rest = list(prefix[pos:])
        if len(rest) > 2 * max(len(s) for s in suffixes):
            # a long uncached prefix: encode it once (batch 1) rather than once per row
            cache, _, _ = self._prefill(prefix, len(suffixes), max(len(s) for s in suffixes), owner)
            pos, rest = len(prefix), []
            path = []
        else:
            cache = None
        rows = [rest + list(s) for s in suffixes]
        width = max(len(r) for r in rows)
        if cache is None:
            cache = _buffer_cache([c.kv for c in path if c.kv is not None], len(rows), pos + width)
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends + ([len(rest) - 1] if rest else [])))
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]
        logits, cache = self._forward(torch.tensor(padded), cache, keep=keep, owners=[owner] * len(rows))
        if rest and self.reuse_cache:
            after_prefix = logits[0, keep.index(len(rest) - 1)].clone()
            node.add(_Chunk(tuple(rest), _cache_kv(cache, pos, pos + len(rest)), after_prefix))
        last = logits[torch.arange(len(rows)), torch.tensor([keep.index(e) for e in ends])]
        probs = torch.softmax(last, dim=-1)
        return probs[:, list(option_ids)].cpu().numpy().astype(np.float64)

    def score_many(self, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]],
                   owners: Sequence[Counters | None] | None = None) -> list[np.ndarray]:
        """`score_options` for several (prefix, suffixes, option_ids) in one batch: the prefixes'
        uncached parts run as one left-padded batch, then every prefix + suffix row as another."""
        if len(requests) == 1 or not self.reuse_cache:
            return [self.score_options(*req, owner=owners[i] if owners else None) for i, req in enumerate(requests)]
        for i, (prefix, suffixes, _) in enumerate(requests):
            if not prefix or not all(suffixes):
                raise RainError("evaluation prompt and its suffixes must not be empty")
            for suffix in suffixes:
                self._asked(list(prefix) + list(suffix), owners[i] if owners else None)
        prefixes = [prefix for prefix, _, _ in requests]
        if self.fuse_scoring:
            found = []  # (cached KV segments, their length); captured at once: later lookups split chunks
            for prefix in prefixes:
                path, _, pos, _ = self.prefix_cache.lookup(prefix)
                found.append(([c.kv for c in path if c.kv is not None], pos))
            if max(pos for _, pos in found) > 0:
                return self._score_fused(requests, found, owners)
        self._encode_many(prefixes, owners)
        width = max(len(s) for _, suffixes, _ in requests for s in suffixes)
        cache, pads, _ = self._gather(prefixes, [len(suffixes) for _, suffixes, _ in requests], width)
        rows = [list(s) for _, suffixes, _ in requests for s in suffixes]
        row_owners = [owners[i] if owners else None for i, (_, suffixes, _) in enumerate(requests) for _ in suffixes]
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends))
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]  # right padding: causal rows never see it
        logits, _ = self._forward(torch.tensor(padded), cache, keep=keep, pads=pads, owners=row_owners)
        return _option_probs(logits, ends, keep, requests)

    def _score_fused(self, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]],
                     found: list[tuple[list[KV], int]],
                     owners: Sequence[Counters | None] | None) -> list[np.ndarray]:
        """`score_many` in one forward: row = a prompt's uncached tail + one option suffix, the
        cached parts left-padded to one column; each tail's KV is stored from its first row."""
        segments = [segs for segs, _ in found]
        starts = [pos for _, pos in found]
        tails = [list(prefix[pos:]) for (prefix, _, _), pos in zip(requests, starts)]
        rows = [tail + list(s) for tail, (_, suffixes, _) in zip(tails, requests) for s in suffixes]
        per = [len(suffixes) for _, suffixes, _ in requests]
        width = max(len(r) for r in rows)
        cache, pads = _padded_cache(segments, per, max(starts) + width)
        firsts = [sum(per[:i]) for i in range(len(requests))]
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends + [len(t) - 1 for t in tails if t]))
        row_owners = [owners[i] if owners else None for i, n in enumerate(per) for _ in range(n)]
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]  # right padding: causal rows never see it
        logits, cache = self._forward(torch.tensor(padded), cache, keep=keep, pads=pads, owners=row_owners)
        for i, ((prefix, _, _), pos, tail) in enumerate(zip(requests, starts, tails)):
            if tail:  # stored from the prompt's first row
                row = firsts[i]
                self._keep_tail(prefix, pos, cache, max(starts), row, logits[row, keep.index(len(tail) - 1)])
        return _option_probs(logits, ends, keep, requests)

    # ------------------------------------------------------------------ memory
    def retain(self, prefixes: Sequence[Sequence[int]], owner: Hashable | None = None, *,
               exact: bool = False) -> None:
        """Free cached work that extends none of `prefixes` (exact=True: keep the prefixes
        themselves, not what extends them). With an `owner` (one of several answers sharing this
        engine), `prefixes` replace that owner's earlier ones and what any live owner retains is
        kept; without, only `prefixes` are kept and all owners forgotten."""
        if owner is None:
            self._retained.clear()
            self.prefix_cache.retain([] if exact else prefixes, prefixes if exact else [])
            return
        self.claim(prefixes, owner, exact=exact)
        kept = [(p, e) for held in self._retained.values() for p, e in held]
        self.prefix_cache.retain([p for p, e in kept if not e], [p for p, e in kept if e])

    def claim(self, prefixes: Sequence[Sequence[int]], owner: Hashable, *, exact: bool = False) -> None:
        """Register what `owner` keeps (as `retain` does) without freeing anything now."""
        self._retained[owner] = [(list(p), exact) for p in prefixes]

    def release(self, owner: Hashable) -> None:
        """An owner is done: what only it retained goes at the next `retain`."""
        self._retained.pop(owner, None)

    def reset(self) -> None:
        self.prefix_cache.clear()
        self._retained.clear()


class _Request:
    """Rows of one `DecodeStream.join`: their tokens so far and what they sample with."""

    def __init__(self, key: Hashable, context: list[int], rows: Sequence[Row], u: np.ndarray,
                 owner: Counters | None):
        self.key, self.context, self.rows, self.u, self.owner = key, context, list(rows), u, owner
        self.tokens: list[list[int]] = [[] for _ in self.rows]
        self.logprob = [0.0] * len(self.rows)
        self.left = len(self.rows)  # rows not done yet
        self.segments: list[KV] = []  # the context's cached KV chunks (batch 1), while joining
        self.tail: int | None = None  # the context's last token, when only it is uncached


class _LiveRow:
    """A row decoding now: its batch slot and the logits after its last fed token."""

    __slots__ = ("request", "r", "slot", "logits")

    def __init__(self, request: _Request, r: int, slot: int, logits: torch.Tensor | None):
        self.request, self.r, self.slot, self.logits = request, r, slot, logits


class DecodeStream:
    """Rows that decode side by side and join or leave between forward passes (continuous
    batching at the level of tokens). Each `step` samples one token for every row that has
    logits, then runs one forward for all rows still going; a row that stops leaves at once (its
    KV goes to the prefix tree) and a request returns as soon as its own rows are done, not when
    the longest row of the batch is. So searches sharing an engine need not wait for each other's
    longest rollout: the number of sequential forward passes, what a GPU pays for, stays close to
    that of the busiest search.

    Layout: one left-padded buffer, every slot's last token at the same column; it is rebuilt
    (one index_select per layer for the slots that go on, one copy per joining context) when rows
    join, leave or branch, and trimmed to the longest live slot then. Rows holding the same
    tokens share a slot. A joining context whose last token alone is uncached (a leaf whose token
    set was just sampled) feeds that token in the step's forward instead of a forward of its own.
    """

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.cache: DynamicCache | None = None
        self.pads: list[int] = []  # per slot: left padding
        self.live: list[_LiveRow] = []
        self.joining: list[_Request] = []
        self.requests: dict[Hashable, _Request] = {}
        self._slot_owner: list[Counters | None] = []  # whose work each slot is

    def __len__(self) -> int:
        return len(self.requests)

    def join(self, key: Hashable, context: Sequence[int], rows: Sequence[Row],
             uniforms: np.ndarray | None = None, owner: Counters | None = None) -> None:
        """Start decoding `rows` after `context` at the next step (`uniforms[r, step]`: row r's
        inverse-CDF draws; None draws them from the engine's generator). `owner` is charged too."""
        if not context:
            raise RainError("empty context: nothing to condition on")
        if key in self.requests:
            raise ValueError(f"request {key!r} is already decoding")
        width = max(r.max_tokens for r in rows)
        if uniforms is None:
            u = torch.rand(len(rows), width, generator=self.engine.generator, dtype=torch.float64).numpy()
        else:
            u = np.full((len(rows), width), 0.5)
            block = np.asarray(uniforms, dtype=np.float64).reshape(len(rows), -1)[:, :width]
            u[:, :block.shape[1]] = block
        request = _Request(key, list(context), rows, u, owner if owner is not None else self.engine.charge_to)
        self.requests[key] = request
        self.joining.append(request)

    def cancel(self, key: Hashable) -> None:
        """Stop a request's rows (its slots go at the next step)."""
        request = self.requests.pop(key, None)
        if request is not None:
            self.joining = [r for r in self.joining if r is not request]
            self.live = [row for row in self.live if row.request is not request]

    @torch.inference_mode()
    def step(self) -> dict[Hashable, list[Sample]]:
        """Admit joining requests, sample one token per row, run one forward; the requests done."""
        ready = self._admit()
        picking = self.live + ready
        finished: dict[Hashable, list[Sample]] = {}
        going: list[_LiveRow] = []
        leaving: dict[int, tuple[_Request, list[tuple[list[int], int, torch.Tensor]]]] = {}
        if picking:
            chosen = self._pick(picking)
            stops = self.engine.stop_ids
            for row, (token, lp) in zip(picking, chosen):
                request, r = row.request, row.r
                tokens = request.tokens[r]
                tokens.append(token)
                request.logprob[r] += lp
                spec = request.rows[r]
                if (token in stops or len(tokens) >= spec.max_tokens
                        or (spec.done is not None and spec.done(tokens))):
                    request.left -= 1
                    self.engine._asked(request.context + tokens[:-1], request.owner)
                    if row.slot >= 0:  # fed tokens are in the buffer: keep them in the prefix tree
                        leaving.setdefault(id(request), (request, []))[1].append((tokens[:-1], row.slot, row.logits))
                    if request.left == 0:
                        finished[request.key] = [Sample(t, lp) for t, lp in zip(request.tokens, request.logprob)]
                else:
                    going.append(row)
        for request, rows in leaving.values():
            self._store(request, rows)
        for key in finished:
            del self.requests[key]
        tails = [request for request in self.joining if request.tail is not None]
        self.joining = []
        self._advance(going, tails)
        return finished

    def _admit(self) -> list[_LiveRow]:
        """Find each joining context's KV; the rows of those fully cached (logits known) pick now,
        the others feed their last token in this step's forward."""
        engine, ready = self.engine, []
        if not self.joining:
            return ready
        for request in self.joining:
            engine._asked(request.context, request.owner)
        if engine.reuse_cache:
            long = [r for r in self.joining if not 0 < engine.prefix_cache.lookup(r.context)[2] >= len(r.context) - 1]
            if long:  # more than the last token uncached: one batched forward for those
                engine._encode_many([r.context for r in long], [r.owner for r in long])
            for request in self.joining:
                path, _, pos, logits = engine.prefix_cache.lookup(request.context)
                request.segments = [c.kv for c in path if c.kv is not None]  # captured now: later lookups split
                if logits is None:
                    request.tail = request.context[-1]
                else:
                    ready += [_LiveRow(request, r, -1, logits) for r in range(len(request.rows))]
        else:
            for request in self.joining:
                cache, logits, _ = engine._prefill(request.context, 1, 0, request.owner)
                request.segments = [_cache_kv(cache, 0, len(request.context))]
                ready += [_LiveRow(request, r, -1, logits) for r in range(len(request.rows))]
        return ready

    def _pick(self, rows: list[_LiveRow]) -> list[tuple[int, float]]:
        """One token per row by its own rule and uniform (rows grouped by rule, one call each)."""
        logits = torch.stack([row.logits for row in rows])
        u = torch.from_numpy(np.array([row.request.u[row.r, len(row.request.tokens[row.r])] for row in rows]))
        greedy = torch.tensor([row.request.rows[row.r].greedy for row in rows])
        by_rule: dict[tuple[float, int], list[int]] = {}
        for i, row in enumerate(rows):
            spec = row.request.rows[row.r]
            by_rule.setdefault((spec.temperature, spec.top_k), []).append(i)
        if len(by_rule) == 1:
            ((temperature, top_k),) = by_rule
            tokens, logprob = _sample(logits, temperature, top_k, u, greedy)
        else:
            tokens = torch.zeros(len(rows), dtype=torch.long)
            logprob = torch.zeros(len(rows), dtype=torch.float64)
            for (temperature, top_k), idx in by_rule.items():
                index = torch.tensor(idx)
                tokens[index], logprob[index] = _sample(logits[index.to(logits.device)], temperature, top_k,
                                                        u[index], greedy[index])
        return list(zip(tokens.tolist(), logprob.tolist()))

    def _store(self, request: _Request, rows: list[tuple[list[int], int, torch.Tensor]]) -> None:
        """Rows of one request leaving together fed as many tokens: they end at the buffer's last column."""
        engine = self.engine
        if not engine.reuse_cache or self.cache is None:
            return
        _, node, pos, _ = engine.prefix_cache.lookup(request.context)
        if pos == len(request.context):
            fed = len(rows[0][0])
            engine._store(node, rows, self.cache, self.cache.layers[0].length - fed)

    def _advance(self, going: list[_LiveRow], tails: list[_Request]) -> None:
        """New slots for the rows that go on (rows with the same parent slot and token share one)
        and for joining contexts that feed their last token; one forward over them."""
        engine = self.engine
        sources: list[tuple[int, _Request | None, int]] = []  # (old slot or -1, joining request, token)
        index: dict[tuple[int, int, int], int] = {}
        tokens_of = {id(row): row.request.tokens[row.r][-1] for row in going}
        for row in sorted(going, key=lambda row: row.slot >= 0, reverse=True):  # slots from the buffer first
            parent = row.slot if row.slot >= 0 else -1
            key = (parent, id(row.request) if parent < 0 else 0, tokens_of[id(row)])
            if key not in index:
                index[key] = len(sources)
                sources.append((parent, row.request if parent < 0 else None, tokens_of[id(row)]))
            row.slot = index[key]
        tail_slot = {}
        for request in tails:
            tail_slot[id(request)] = len(sources)
            sources.append((-1, request, request.tail))
        self.live = going + [_LiveRow(request, r, tail_slot[id(request)], None) for request in tails
                             for r in range(len(request.rows))]
        if not sources:
            self.cache, self.pads = None, []
            return
        room = 1 + max((row.request.rows[row.r].max_tokens - len(row.request.tokens[row.r]) for row in self.live),
                       default=0)
        self._rebuild(sources, room)
        ids = torch.tensor([[token] for _, _, token in sources])
        out, self.cache = engine._forward(ids, self.cache, pads=self.pads, owners=self._slot_owner)
        fresh = out[:, -1]
        for row in self.live:
            row.logits = fresh[row.slot]
        for request in tails:  # the context's last token is computed now: keep it with its logits
            if engine.reuse_cache:
                slot, column = tail_slot[id(request)], self.cache.layers[0].length - 1
                engine._keep_tail(request.context, len(request.context) - 1, self.cache, column, slot, fresh[slot])
            request.tail, request.segments = None, []

    def _rebuild(self, sources: list[tuple[int, _Request | None, int]], room: int) -> None:
        """The buffer for the next forward: each new slot copies an old slot or a joining context,
        left-padded to the longest, with `room` more columns; kept as it is when every old slot
        goes on in place and there is room."""
        old = self.cache
        col = old.layers[0].length if old is not None else 0
        parents = [parent for parent, _, _ in sources]
        self._slot_owner = [self._slot_owner[p] if p >= 0 else request.owner for p, request, _ in sources]
        if (old is not None and parents == list(range(old.layers[0].kbuf.shape[0]))
                and col < old.layers[0].kbuf.shape[2]):
            return
        lengths = [col - self.pads[p] if p >= 0 else sum(kv[0][0].shape[-2] for kv in request.segments)
                   for p, request, _ in sources]
        width = max(lengths)
        kept = [p for p in parents if p >= 0]
        kept_width = max(lengths[:len(kept)], default=0)
        alloc = torch.zeros if any(n < width for n in lengths) else torch.empty  # padding must be finite
        joining = next((request for p, request, _ in sources if p < 0), None)
        model_layers = old.layers if old is not None else joining.segments[0]  # shapes, dtype, device
        layers = []
        for layer in range(len(model_layers)):
            if old is not None:
                k0, v0 = old.layers[layer].kbuf, old.layers[layer].vbuf
            else:
                k0, v0 = joining.segments[0][layer]
            shape = (len(sources), k0.shape[1], width + room, k0.shape[3])
            kbuf = alloc(shape, dtype=k0.dtype, device=k0.device)
            vbuf = alloc((*shape[:3], v0.shape[3]), dtype=v0.dtype, device=v0.device)
            if kept:
                index = torch.tensor(kept, device=k0.device)
                kbuf[:len(kept), :, width - kept_width:width] = k0[:, :, col - kept_width:col].index_select(0, index)
                vbuf[:len(kept), :, width - kept_width:width] = v0[:, :, col - kept_width:col].index_select(0, index)
            slot = len(kept)
            while slot < len(sources):  # a joining context's slots are consecutive: one copy for them
                request, end = sources[slot][1], slot
                while end < len(sources) and sources[end][1] is request:
                    end += 1
                n = lengths[slot]
                kbuf[slot:end, :, width - n:width] = _concat(request.segments, layer, 0)
                vbuf[slot:end, :, width - n:width] = _concat(request.segments, layer, 1)
                slot = end
            layers.append(_BufferLayer(kbuf, vbuf, width))
        self.cache = DynamicCache()
        self.cache.layers = layers
        self.pads = [width - n for n in lengths]


def _option_probs(logits: torch.Tensor, ends: list[int], keep: list[int],
                  requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]]) -> list[np.ndarray]:
    """Each request's option probabilities from the logits at its rows' last positions (`ends`,
    found among the kept positions); rows in request order, one per suffix."""
    last = logits[torch.arange(len(ends)), torch.tensor([keep.index(e) for e in ends])]
    probs = torch.softmax(last, dim=-1).cpu().numpy().astype(np.float64)
    blocks = split(probs, [len(suffixes) for _, suffixes, _ in requests])
    return [block[:, list(option_ids)] for block, (_, _, option_ids) in zip(blocks, requests)]


def _sample(logits: torch.Tensor, temperature: float, top_k: int, u: torch.Tensor,
            greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the logits warped by temperature then top-k (the official logits
    processors' order), chosen by inverse CDF with uniforms `u` (same u -> same token), or the
    most likely token for greedy rows; with its log probability under the warped distribution.
    A top-k rule works on the k largest logits only (sorted), not on the whole vocabulary.
    Runs where `logits` live; returns CPU tensors (tokens long, log probabilities float64)."""
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        scaled, vocab_ids = torch.topk(scaled, top_k, dim=-1)  # descending: column 0 is the argmax
    else:
        vocab_ids = None
    probs = torch.softmax(scaled.double() if vocab_ids is not None else scaled, dim=-1)
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (u.double().to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    col = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    # never land on a zero-probability token (possible only through rounding at the edges)
    best = torch.zeros_like(col) if vocab_ids is not None else torch.argmax(probs, dim=-1)
    col = torch.where(probs.gather(1, col.view(-1, 1)).squeeze(1) == 0, best, col)
    if greedy.any():
        col = torch.where(greedy.to(col.device), best, col)
    logprob = torch.log(probs.gather(1, col.view(-1, 1)).squeeze(1)).double()
    tokens = vocab_ids.gather(1, col.view(-1, 1)).squeeze(1) if vocab_ids is not None else col
    return tokens.cpu(), logprob.cpu()
