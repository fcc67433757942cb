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

from ..errors import RainError
from .base import Counters, Row, Sample, split

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


def _select_rows(cache: DynamicCache, rows: list[int]) -> None:
    """Keep only some batch rows of a buffer cache (finished rows leave the batch)."""
    index = torch.tensor(rows)
    for layer in cache.layers:
        layer.kbuf = layer.kbuf.index_select(0, index.to(layer.kbuf.device))
        layer.vbuf = layer.vbuf.index_select(0, index.to(layer.vbuf.device))
        layer.keys, layer.values = layer.kbuf[:, :, :layer.length], layer.vbuf[:, :, :layer.length]


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
            _, node, now, logits = self.prefix_cache.lookup(context)
            if logits is None:  # not stored by an identical row of this batch
                kv = _cache_kv(cache, start + now - pos, start + len(context) - pos, row)
                node.add(_Chunk(tuple(context[now:]), kv, out[row, keep.index(ends[row])].clone()))

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
    def _decode(self, groups: Sequence[tuple[Sequence[int], int]], length: int,
                pick: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                done: Callable[[int, list[int]], bool],
                owners: Sequence[Counters | None] | None = None) -> tuple[list[list[int]], list[float]]:
        """Shared decode loop over groups of rows (context, number of rows): `pick(logits [rows,
        vocab], step) -> (tokens, logprobs)`; a row stops once `done(row, its tokens)`. Finished
        rows leave the batch (their KV goes to the prefix tree first), so a long row does not drag
        the short ones along. Several contexts share one left-padded batch (reuse on)."""
        group_of = [g for g, (_, n) in enumerate(groups) for _ in range(n)]
        rows = len(group_of)
        if owners is None and self.charge_to is not None:
            owners = [self.charge_to] * len(groups)
        row_owner = [owners[g] for g in group_of] if owners else None
        if len(groups) == 1:
            context = groups[0][0]
            cache, logits, node = self._prefill(context, rows, length, owners[0] if owners else None)
            pads, start, first = None, len(context), [logits]
            nodes: list[Any] = [node]
        else:
            for g, (context, _) in enumerate(groups):
                self._asked(context, owners[g] if owners else None)
            self._encode_many([c for c, _ in groups], owners)
            cache, pads, first = self._gather([c for c, _ in groups], [n for _, n in groups], length)
            start, nodes = max(len(c) for c, _ in groups), [None] * len(groups)
        step_logits = torch.stack([first[g] for g in group_of])  # [rows, vocab]; finished rows are stale
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprob = [0.0] * rows
        # Rows holding the same tokens so far share one batch slot (one forward row, one KV row):
        # sampled rows often repeat the greedy row's first tokens, and computing them twice is waste.
        # At the start every row of a group shares the group's first row (identical contexts).
        first_row = {g: group_of.index(g) for g in range(len(groups))}
        slot_of = [first_row[g] for g in group_of]  # each live row's slot in the cache
        active = list(range(rows))  # live rows
        last_logits: list[torch.Tensor] = [first[g] for g in group_of]  # after each row's last fed token
        for step in range(length):
            chosen, lp = pick(step_logits, step)
            chosen_list, lp_list = chosen.tolist(), lp.tolist()
            still, leaving = [], []
            for r in active:
                tokens[r].append(chosen_list[r])
                logprob[r] += lp_list[r]
                if done(r, tokens[r]) or step == length - 1:
                    leaving.append((tokens[r][:-1], slot_of[r], last_logits[r], group_of[r]))
                    self._asked(list(groups[group_of[r]][0]) + tokens[r][:-1], row_owner[r] if row_owner else None)
                else:
                    still.append(r)
            for g in sorted({leave[3] for leave in leaving}):
                node = nodes[g]
                if node is None and self.reuse_cache:  # looked up now: other groups' lookups split chunks
                    _, node, pos, _ = self.prefix_cache.lookup(groups[g][0])
                    node = node if pos == len(groups[g][0]) else None
                self._store(node, [leave[:3] for leave in leaving if leave[3] == g], cache, start)
            if not still:
                break
            fed: dict[tuple[int, int], int] = {}  # (parent slot, token) -> new slot
            rep: list[int] = []  # a row fed in each new slot
            for r in still:
                key = (slot_of[r], chosen_list[r])
                if key not in fed:
                    fed[key] = len(rep)
                    rep.append(r)
                slot_of[r] = fed[key]
            parents = [parent for parent, _ in fed]
            if parents != list(range(cache.layers[0].kbuf.shape[0])):
                _select_rows(cache, parents)
            active = still
            out, cache = self._forward(torch.tensor([[chosen_list[r]] for r in rep]), cache,
                                       pads=[pads[r] for r in rep] if pads else None,
                                       owners=[row_owner[r] for r in rep] if row_owner else None)
            fresh = out[:, -1]
            step_logits = step_logits.clone() if step == 0 else step_logits
            rows_now = torch.tensor(active, device=fresh.device)
            step_logits[rows_now] = fresh[torch.tensor([slot_of[r] for r in active], device=fresh.device)]
            for r in active:
                last_logits[r] = fresh[slot_of[r]]
        return tokens, logprob

    def decode_rows(self, context: Sequence[int], rows: Sequence[Row],
                    uniforms: np.ndarray | None = None) -> list[Sample]:
        """Decode several rows as one batch over the shared context, each with its own
        sampling rule and stop rule. Row r samples with uniforms[r, step] (inverse CDF), so a
        row gives the same tokens alone or in a batch."""
        return self.decode_groups([(context, rows, uniforms)])[0]

    def decode_groups(self, requests: Sequence[tuple[Sequence[int], Sequence[Row], np.ndarray | None]],
                      owners: Sequence[Counters | None] | None = None) -> list[list[Sample]]:
        """`decode_rows` for several contexts in one batch: each request is (context, rows,
        uniforms or None). `owners[i]` (optional) is also charged request i's work."""
        if not requests or any(not context for context, _, _ in requests):
            raise RainError("empty context: nothing to condition on")
        if len(requests) > 1 and not self.reuse_cache:  # no prefix tree to gather from: one at a time
            return [self.decode_groups([req], [owners[i]] if owners else None)[0] for i, req in enumerate(requests)]
        all_rows = [row for _, rows, _ in requests for row in rows]
        n, length = len(all_rows), max(r.max_tokens for r in all_rows)
        u = torch.full((n, length), 0.5, dtype=torch.float64)
        start = 0
        for _, rows, uniforms in requests:
            width = max(r.max_tokens for r in rows)
            if uniforms is None:
                uniforms = torch.rand(len(rows), width, generator=self.generator, dtype=torch.float64).numpy()
            block = torch.as_tensor(np.asarray(uniforms, dtype=np.float64).reshape(len(rows), -1))
            u[start:start + len(rows), :block.shape[1]] = block[:, :length]
            start += len(rows)
        by_rule: dict[tuple[float, int], list[int]] = {}
        for i, r in enumerate(all_rows):
            by_rule.setdefault((r.temperature, r.top_k), []).append(i)
        greedy = torch.tensor([r.greedy for r in all_rows])

        rules = [(temperature, top_k, torch.tensor(idx), greedy[idx]) for (temperature, top_k), idx in by_rule.items()]

        def pick(logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            if len(rules) == 1:
                temperature, top_k, _, is_greedy = rules[0]
                return _sample(logits, temperature, top_k, u[:, step], is_greedy)
            chosen = torch.zeros(n, dtype=torch.long)
            logprob = torch.zeros(n, dtype=torch.float64)
            for temperature, top_k, idx, is_greedy in rules:
                chosen[idx], logprob[idx] = _sample(logits[idx.to(logits.device)], temperature, top_k, u[idx, step],
                                                    is_greedy)
            return chosen, logprob

        stops = self.stop_ids

        def done(i: int, tokens: list[int]) -> bool:
            row = all_rows[i]
            return (tokens[-1] in stops or len(tokens) >= row.max_tokens
                    or (row.done is not None and row.done(tokens)))

        groups = [(context, len(rows)) for context, rows, _ in requests]
        tokens, logprob = self._decode(groups, length, pick, done, owners)
        return split([Sample(t, lp) for t, lp in zip(tokens, logprob)], [len(rows) for _, rows, _ in requests])

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
        self._encode_many(prefixes, owners)
        width = max(len(s) for _, suffixes, _ in requests for s in suffixes)
        cache, pads, _ = self._gather(prefixes, [len(suffixes) for _, suffixes, _ in requests], width)
        rows = [list(s) for _, suffixes, _ in requests for s in suffixes]
        row_owners = [owners[i] if owners else None for i, (_, suffixes, _) in enumerate(requests) for _ in suffixes]
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends))
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]  # right padding: causal rows never see it
        logits, _ = self._forward(torch.tensor(padded), cache, keep=keep, pads=pads, owners=row_owners)
        last = logits[torch.arange(len(rows)), torch.tensor([keep.index(e) for e in ends])]
        probs = torch.softmax(last, dim=-1).cpu().numpy().astype(np.float64)
        blocks = split(probs, [len(suffixes) for _, suffixes, _ in requests])
        return [block[:, list(option_ids)] for block, (_, _, option_ids) in zip(blocks, requests)]

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
