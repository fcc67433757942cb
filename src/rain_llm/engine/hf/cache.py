"""The prefix cache of the transformers engine: a radix tree of KV chunks, and KV buffers.

Why: every call of the search shares a long prefix with an earlier one (the prompt, the
committed answer, the path to the leaf; the self-evaluation template and the conversation).
`PrefixCache` is a radix tree of token chunks, each holding the keys/values of its tokens and the
next-token logits after its last token. A call finds the longest cached prefix of its context,
runs only the tokens after it, and stores what it computed. Attention keys/values of a prefix do
not depend on what follows, so slices of chunks are valid caches.

Decoding runs in preallocated buffers (`BufferLayer`): appending a token writes in place
instead of concatenating the whole cache each step; `padded_cache` lays several contexts side by
side, left-padded to end at one column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape [batch, heads, len, dim]


class Chunk:
    """A run of tokens in the prefix tree, with its KV (batch 1) and the logits after it."""

    __slots__ = ("tokens", "kv", "logits", "children")

    def __init__(self, tokens: tuple[int, ...], kv: KV | None, logits: torch.Tensor | None):
        self.tokens = tokens
        self.kv = kv
        self.logits = logits
        self.children: dict[int, list[Chunk]] = {}

    def add(self, child: Chunk) -> None:
        self.children.setdefault(child.tokens[0], []).append(child)

    def split(self, m: int) -> None:
        """Keep the first m tokens here; move the rest (and the children) to a new child."""
        assert self.kv is not None and 0 < m < len(self.tokens)
        tail = Chunk(self.tokens[m:], [(k[:, :, m:], v[:, :, m:]) for k, v in self.kv], self.logits)
        tail.children = self.children
        self.tokens = self.tokens[:m]
        self.kv = [(k[:, :, :m], v[:, :, :m]) for k, v in self.kv]
        self.logits = None
        self.children = {}
        self.add(tail)


class PrefixCache:
    """Radix tree of `Chunk`s rooted at the empty context."""

    def __init__(self) -> None:
        self.root = Chunk((), None, None)

    def lookup(self, context: Sequence[int]) -> tuple[list[Chunk], Chunk, int, torch.Tensor | None]:
        """Longest cached prefix of `context`, leaving at least one token to run unless the
        logits after the whole context are cached.

        Returns (chunks along the prefix, the chunk to attach new work to, prefix length,
        cached next-token logits if the whole context is cached)."""
        node, pos, path = self.root, 0, []
        while pos < len(context):
            best, best_m = None, 0
            for c in node.children.get(context[pos], ()):
                m = common(c.tokens, context, pos)
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

    def continuation(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens the tree holds right after exactly `tokens` (text the engine already
        ran after them: an earlier rollout or token set from the same node), following the
        longest chunk at each branch; [] if the tree holds nothing after them. Changes nothing."""
        node, pos, n = self.root, 0, len(tokens)
        draft: list[int] = []
        while pos < n:
            inside = None
            for c in node.children.get(tokens[pos], ()):
                end = pos + len(c.tokens)
                if end <= n and c.tokens == tuple(tokens[pos:end]):
                    node, pos = c, end
                    break
                if end > n and c.tokens[:n - pos] == tuple(tokens[pos:]):
                    inside = c
            else:
                if inside is None:
                    return []
                draft = list(inside.tokens[n - pos:])
                node, pos = inside, n
        while len(draft) < limit and node.children:
            node = max((c for cs in node.children.values() for c in cs), key=lambda c: len(c.tokens))
            draft += node.tokens
        return draft[:limit]

    def retain(self, prefixes: Sequence[Sequence[int]], exact: Sequence[Sequence[int]] = ()) -> None:
        """Drop every branch that is compatible with none of `prefixes` (a prefix keeps all that
        extends it) and none of `exact` (kept themselves, not what extends them)."""

        def compatible(tokens: tuple[int, ...], offset: int, prefix: Sequence[int]) -> bool:
            overlap = prefix[offset:offset + len(tokens)]
            return tuple(overlap) == tokens[:len(overlap)]

        def walk(node: Chunk, offset: int, alive: list[tuple[Sequence[int], bool]]) -> None:
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
        self.root = Chunk((), None, None)

    def num_tokens(self) -> int:
        """Token positions held (for memory tests)."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.tokens)
            stack.extend(c for cs in node.children.values() for c in cs)
        return total


def shared_prefixes(contexts: list[tuple[list[int], int]], min_saving: int) -> list[list[int]]:
    """Prefixes that several contexts (each with its cached length) share past what is cached,
    worth encoding once first: encoding them once saves (sharers - 1) x uncached length tokens, at
    least `min_saving`. Shortest ones only (a longer run shared by some of them stays in their
    tails), each shorter than the contexts that share it."""
    ordered = sorted(contexts, key=lambda c: c[0])
    found: dict[tuple[int, ...], int] = {}  # shared prefix -> its uncached length
    for (a, pa), (b, pb) in zip(ordered, ordered[1:]):
        n = min(common(tuple(a), b, 0), len(a) - 1, len(b) - 1)  # leave each context a token of its own
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


def common(tokens: tuple[int, ...], context: Sequence[int], pos: int) -> int:
    m, limit = 0, min(len(tokens), len(context) - pos)
    while m < limit and tokens[m] == context[pos + m]:
        m += 1
    return m


class BufferLayer(DynamicLayer):
    """A cache layer over a preallocated [batch, heads, capacity, dim] buffer: appends in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.kbuf, self.vbuf, self.length = keys, values, length
        self.is_initialized = True
        self.device = keys.device
        self.dtype = keys.dtype
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
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

    def truncate(self, length: int) -> None:
        """Forget the columns from `length` on (a rejected draft's): the next tokens go there."""
        self.length = length
        self.keys, self.values = self.kbuf[:, :, :length], self.vbuf[:, :, :length]


def buffer_cache(segments: list[KV], rows: int, capacity: int) -> DynamicCache | None:
    """A cache of `rows` identical rows holding the concatenated segments, room for `capacity`."""
    return padded_cache([segments], [rows], capacity)[0] if segments else None


def concat(segments: list[KV], layer: int, which: int) -> torch.Tensor:
    """One layer's keys (which = 0) or values (1) of consecutive segments, as one tensor."""
    parts = [seg[layer][which] for seg in segments]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def padded_cache(segments: list[list[KV]], rows: list[int], capacity: int) -> tuple[DynamicCache, list[int]]:
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
                kbuf[row:row + r, :, width - n:width] = concat(segs, layer, 0)
                vbuf[row:row + r, :, width - n:width] = concat(segs, layer, 1)
            row += r
        layers.append(BufferLayer(kbuf, vbuf, width))
    return buffered(layers), pads


def buffered(layers: list[BufferLayer]) -> DynamicCache:
    """A cache over these buffers (what the model's forward appends to in place)."""
    cache = DynamicCache()
    cache.layers = cast(Any, layers)
    return cache


def buffers(cache: DynamicCache) -> list[BufferLayer]:
    """The layers of a cache this engine laid out (`buffered`)."""
    return cast("list[BufferLayer]", cache.layers)


def cache_kv(cache: DynamicCache, start: int, end: int, row: int = 0) -> KV:
    """Copy positions [start, end) of one row out of a cache (for storing in the prefix tree)."""
    layers = cast("list[DynamicLayer]", cache.layers)  # a fresh DynamicCache's, or our buffers
    return [(_kv(layer.keys)[row:row + 1, :, start:end].clone(), _kv(layer.values)[row:row + 1, :, start:end].clone())
            for layer in layers]


def _kv(tensor: torch.Tensor | None) -> torch.Tensor:
    if tensor is None:
        raise RuntimeError("engine bug: an empty cache layer")
    return tensor

