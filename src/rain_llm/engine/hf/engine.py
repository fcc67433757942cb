"""The transformers engine: one causal LM, its prefix cache, and the batched forwards over it.

Everything here is private to the transformers backend (`HFBackend` in backend.py is its face to
the runtime; `DecodeStream` in stream.py its token-level decode batch). A forward charges each of
its rows to the receipt of the request the row serves, so work is booked per request however
requests share a batch.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from rain_llm.engine.hf.cache import (
    KV,
    Chunk,
    PrefixCache,
    buffer_cache,
    buffers,
    cache_kv,
    padded_cache,
    shared_prefixes,
)
from rain_llm.errors import RainError
from rain_llm.runtime.accounting import Receipt
from rain_llm.runtime.backend import Score
from rain_llm.runtime.text import Codec

_ENGINE_IDS = itertools.count()


def context_window(config: Any) -> int:
    """The model's maximum sequence length, from its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class HFEngine:
    """A transformers causal LM with KV reuse across calls (one cache scope; `scope()` makes
    another over the same weights)."""

    def __init__(self, model: Any, codec: Codec, *, reuse_cache: bool = True, seed: int = 0, speculate: int = 0):
        self.model = model.eval()
        self.codec = codec
        self.reuse_cache = reuse_cache
        # Exact speculation: the most draft tokens a decode slot feeds after its token (0: off);
        # drafts come from the prefix tree (with reuse_cache), else from rows decoded earlier (stream.py).
        self.speculate = speculate
        self.uid = next(_ENGINE_IDS)  # forward passes are named (uid, number) in receipts
        self.forwards = 0
        self.touched: set[Receipt] = set()  # receipts charged since the caller last cleared this
        self.prefix_cache = PrefixCache()
        self._retained: dict[Hashable, list[tuple[list[int], bool]]] = {}  # per owner (answers sharing the engine)
        self.context_window = context_window(model.config)
        self.device = model.get_input_embeddings().weight.device
        self.generator = torch.Generator().manual_seed(seed)
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        # Score a batch of evaluation prompts in one forward (each option row repeats its prompt's
        # uncached tail) rather than two (tails once, then the option rows): on a GPU a forward's
        # fixed cost outweighs the repeated tokens; on a CPU every token costs, so two forwards.
        self.fuse_scoring = self.device.type == "cuda"
        # About what a forward's fixed cost is worth in tokens here: contexts of one batch that share
        # a long uncached prefix (a cold cache: the evaluation template, a system prompt) get it
        # encoded once when that saves at least this many tokens, and tails of very different
        # lengths are encoded in separate forwards when padding them together would waste more.
        self.min_shared_saving = 1024 if self.device.type == "cuda" else 64

    def scope(self, *, reuse_cache: bool | None = None) -> HFEngine:
        """The same weights with a cache of their own."""
        return HFEngine(self.model, self.codec, reuse_cache=self.reuse_cache if reuse_cache is None else reuse_cache,
                        speculate=self.speculate)

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.codec.stop_ids

    # ------------------------------------------------------------------ forwards
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: DynamicCache | None, keep: int | list[int] = 1,
                pads: list[int] | None = None, receipts: Sequence[Receipt] = ()) -> tuple[torch.Tensor, DynamicCache]:
        """Run `ids` [rows, n] after `cache`; return float32 logits [rows, kept, vocab] of the last
        `keep` positions, or of the positions listed in `keep`. `pads`: each row's left padding in
        the cache (rows of different contexts), masked out, positions counted after it.
        `receipts`: whose work each row is (one per row, or one for all rows)."""
        if cache is None:
            cache = DynamicCache()
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        index = torch.tensor(keep) if isinstance(keep, list) else None
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = index.to(self.device) if index is not None else keep
        past, n = cache.get_seq_length(), ids.shape[1]
        if (pads is not None and any(pads)) or past + n > self.context_window:
            # Columns past the window (padding, a draft's tail) are never a real token's: their
            # outputs are dropped, so they may share the last position (a model with learned position
            # embeddings has none beyond it).
            pad = torch.tensor(pads if pads is not None else [0] * ids.shape[0], device=self.device).unsqueeze(1)
            columns = torch.arange(past + n, device=self.device).unsqueeze(0)
            kwargs["attention_mask"] = (columns >= pad).long()
            kwargs["position_ids"] = (columns[:, past:] - pad).clamp(min=0, max=self.context_window - 1)
        out = self.model(input_ids=ids.to(self.device), **kwargs)
        self._charge(receipts, ids.shape[0], ids.shape[1])
        logits = out.logits
        if not self._logits_to_keep:
            logits = logits[:, index.to(logits.device)] if index is not None else logits[:, -keep:]  # type: ignore[operator]
        return logits.float(), cache

    def _charge(self, receipts: Sequence[Receipt], rows: int, positions: int) -> None:
        """One forward of `rows` x `positions`: each row's receipt gets its rows' positions."""
        self.forwards += 1
        name = (self.uid, self.forwards)
        per_row = list(receipts) if len(receipts) == rows else list(receipts[:1]) * rows
        for receipt in per_row:
            receipt.add(name, positions)
            self.touched.add(receipt)

    def prefill(self, context: Sequence[int], receipt: Receipt, rows: int = 1,
                extra: int = 0) -> tuple[DynamicCache, torch.Tensor]:
        """Encode `context` (reusing cached prefixes) into a cache of `rows` rows with room for
        `extra` more tokens; returns it and the next-token logits [vocab]."""
        if not context:
            raise RainError("empty context: nothing to condition on")
        if self.reuse_cache:
            path, node, pos, logits = self.prefix_cache.lookup(context)
        else:
            path, node, pos, logits = [], None, 0, None
        segments: list[KV] = [c.kv for c in path if c.kv is not None]
        if logits is None:
            feed = list(context[pos:])
            cache = buffer_cache(segments, 1, len(context) + (extra if rows == 1 else 0))
            out, cache = self.forward(torch.tensor([feed]), cache, receipts=[receipt])
            logits = out[0, -1]
            computed = cache_kv(cache, pos, len(context))
            if node is not None:  # reuse on
                node.add(Chunk(tuple(feed), computed, logits))
            if rows == 1 and segments:  # the buffer already holds everything
                return cache, logits
            segments = segments + [computed]
        return buffer_cache(segments, rows, len(context) + extra), logits  # type: ignore[return-value]

    def store(self, node: Any, leaving: list[tuple[list[int], int, torch.Tensor]], cache: DynamicCache,
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
        layers = buffers(cache)
        index = torch.tensor([slot for _, slot, _ in fresh], device=layers[0].kbuf.device)
        block = [(layer.kbuf[:, :, start:start + n].index_select(0, index),
                  layer.vbuf[:, :, start:start + n].index_select(0, index)) for layer in layers]
        for j, (key, _, logits) in enumerate(fresh):
            node.add(Chunk(key, [(k[j:j + 1], v[j:j + 1]) for k, v in block], logits.clone()))

    def keep_tail(self, context: Sequence[int], pos: int, cache: DynamicCache, start: int, row: int,
                  logits: torch.Tensor) -> None:
        """Store in the prefix tree what a batch just computed for `context`: its tokens from `pos`
        sit from column `start` of batch row `row` (earlier tokens before it), `logits` follow its
        last token. Skipped if an identical row of the batch stored it already."""
        _, node, now, cached = self.prefix_cache.lookup(context)
        if cached is None:
            kv = cache_kv(cache, start + now - pos, start + len(context) - pos, row)
            node.add(Chunk(tuple(context[now:]), kv, logits.clone()))

    # ------------------------------------------------------------------ several contexts at once
    def encode_many(self, contexts: Sequence[Sequence[int]], receipts: Sequence[Receipt]) -> None:
        """Put every context, with the logits after it, in the prefix tree (reuse on). The uncached
        tails run as one batch, or a few when their lengths differ so much that padding them to
        one width would waste more than a forward costs: cached parts left-padded to end at one
        column, tails fed from there and right-padded (causal rows never see their right padding)."""
        todo: dict[tuple[int, ...], tuple[list[int], list[KV], int, Receipt]] = {}
        for context, receipt in zip(contexts, receipts):
            if not context:
                raise RainError("empty context: nothing to condition on")
            key = tuple(context)
            if key in todo:
                continue
            path, _, pos, logits = self.prefix_cache.lookup(context)
            if logits is None:  # segments are captured now: later lookups may split these chunks
                todo[key] = (list(context), [c.kv for c in path if c.kv is not None], pos, receipt)
        if not todo:
            return
        shared = shared_prefixes([(context, pos) for context, _, pos, _ in todo.values()], self.min_shared_saving)
        if shared:  # encode each long prefix that several contexts share once, not once per row
            first = {tuple(c[:len(p)]): r for c, _, _, r in reversed(list(todo.values())) for p in shared}
            self.encode_many(shared, [first[tuple(p)] for p in shared])
            self.encode_many([context for context, _, _, _ in todo.values()], [r for _, _, _, r in todo.values()])
            return
        for batch in _by_length(list(todo.values()), self.min_shared_saving):
            self._encode_tails(batch)

    def _encode_tails(self, batch: list[tuple[list[int], list[KV], int, Receipt]]) -> None:
        start = max(pos for _, _, pos, _ in batch)  # column where every tail begins
        tails = [context[pos:] for context, _, pos, _ in batch]
        width = max(len(t) for t in tails)
        pads = [start - pos for _, _, pos, _ in batch]
        cache = padded_cache([segs for _, segs, _, _ in batch], [1] * len(batch), start + width)[0] \
            if start > 0 else None
        ids = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tails])
        ends = [len(t) - 1 for t in tails]
        keep = sorted(set(ends))
        out, cache = self.forward(ids, cache, keep=keep, pads=pads if start > 0 else None,
                                  receipts=[r for _, _, _, r in batch])
        for row, (context, _, pos, _) in enumerate(batch):
            self.keep_tail(context, pos, cache, start, row, out[row, keep.index(ends[row])])

    def gather(self, contexts: Sequence[Sequence[int]], rows: Sequence[int],
               extra: int) -> tuple[DynamicCache, list[int], list[torch.Tensor]]:
        """A left-padded cache with rows[g] rows of context g (all in the prefix tree, see
        `encode_many`) and room for `extra` more tokens; each row's padding; the logits after
        each context."""
        segments, logits = [], []
        for context in contexts:
            path, _, pos, after = self.prefix_cache.lookup(context)
            if after is None or pos != len(context):
                raise RuntimeError("engine bug: context not cached before gathering")
            segments.append([c.kv for c in path if c.kv is not None])
            logits.append(after)
        cache, pads = padded_cache(segments, list(rows), max(len(c) for c in contexts) + extra)
        return cache, pads, logits

    # ------------------------------------------------------------------ scoring
    def score_one(self, request: Score, receipt: Receipt) -> np.ndarray:
        """One batched forward: each row is the uncached rest of the prefix plus one suffix,
        right-padded (causal attention never looks at the padding). The prefix's KV is stored
        from row 0 so the next evaluation of a longer answer starts from it."""
        prefix, suffixes, option_ids = request.prefix, request.suffixes, request.option_ids
        if self.reuse_cache:
            path, node, pos, _ = self.prefix_cache.lookup(prefix)
        else:
            path, node, pos = [], None, 0
        rest = list(prefix[pos:])
        if len(rest) > 2 * max(len(s) for s in suffixes):
            # a long uncached prefix: encode it once (batch 1) rather than once per row
            cache, _ = self.prefill(prefix, receipt, len(suffixes), max(len(s) for s in suffixes))
            pos, rest = len(prefix), []
            path = []
        else:
            cache = None
        rows = [rest + list(s) for s in suffixes]
        width = max(len(r) for r in rows)
        if cache is None:
            cache = buffer_cache([c.kv for c in path if c.kv is not None], len(rows), pos + width)
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends + ([len(rest) - 1] if rest else [])))
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]
        logits, cache = self.forward(torch.tensor(padded), cache, keep=keep, receipts=[receipt])
        if rest and node is not None:  # reuse on
            after_prefix = logits[0, keep.index(len(rest) - 1)].clone()
            node.add(Chunk(tuple(rest), cache_kv(cache, pos, pos + len(rest)), after_prefix))
        last = logits[torch.arange(len(rows)), torch.tensor([keep.index(e) for e in ends])]
        probs = torch.softmax(last, dim=-1)
        return probs[:, list(option_ids)].cpu().numpy().astype(np.float64)

    def score_many(self, requests: Sequence[Score], receipts: Sequence[Receipt]) -> list[np.ndarray]:
        """`score_one` for several requests in one batch: the prefixes' uncached parts run as one
        left-padded batch, then every prefix + suffix row as another (or all in one, see
        `fuse_scoring`)."""
        for request in requests:
            if not request.prefix or not all(request.suffixes):
                raise RainError("evaluation prompt and its suffixes must not be empty")
        if len(requests) == 1 or not self.reuse_cache:
            return [self.score_one(request, receipt) for request, receipt in zip(requests, receipts)]
        prefixes = [request.prefix for request in requests]
        if self.fuse_scoring:
            found = []  # (cached KV segments, their length); captured at once: later lookups split chunks
            for prefix in prefixes:
                path, _, pos, _ = self.prefix_cache.lookup(prefix)
                found.append(([c.kv for c in path if c.kv is not None], pos))
            if max(pos for _, pos in found) > 0:
                return self._score_fused(requests, found, receipts)
        self.encode_many(prefixes, receipts)
        width = max(len(s) for request in requests for s in request.suffixes)
        cache, pads, _ = self.gather(prefixes, [len(request.suffixes) for request in requests], width)
        rows = [list(s) for request in requests for s in request.suffixes]
        row_receipts = [receipt for request, receipt in zip(requests, receipts) for _ in request.suffixes]
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends))
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]  # right padding: causal rows never see it
        logits, _ = self.forward(torch.tensor(padded), cache, keep=keep, pads=pads, receipts=row_receipts)
        return _option_probs(logits, ends, keep, requests)

    def _score_fused(self, requests: Sequence[Score], found: list[tuple[list[KV], int]],
                     receipts: Sequence[Receipt]) -> list[np.ndarray]:
        """`score_many` in one forward: row = a prompt's uncached tail + one option suffix, the
        cached parts left-padded to one column; each tail's KV is stored from its first row."""
        segments = [segs for segs, _ in found]
        starts = [pos for _, pos in found]
        tails = [list(request.prefix[pos:]) for request, pos in zip(requests, starts)]
        rows = [tail + list(s) for tail, request in zip(tails, requests) for s in request.suffixes]
        per = [len(request.suffixes) for request in requests]
        width = max(len(r) for r in rows)
        cache, pads = padded_cache(segments, per, max(starts) + width)
        firsts = [sum(per[:i]) for i in range(len(requests))]
        ends = [len(r) - 1 for r in rows]
        keep = sorted(set(ends + [len(t) - 1 for t in tails if t]))
        row_receipts = [receipt for receipt, n in zip(receipts, per) for _ in range(n)]
        padded = [r + [r[-1]] * (width - len(r)) for r in rows]  # right padding: causal rows never see it
        logits, cache = self.forward(torch.tensor(padded), cache, keep=keep, pads=pads, receipts=row_receipts)
        for i, (request, pos, tail) in enumerate(zip(requests, starts, tails)):
            if tail:  # stored from the prompt's first row
                row = firsts[i]
                self.keep_tail(request.prefix, pos, cache, max(starts), row, logits[row, keep.index(len(tail) - 1)])
        return _option_probs(logits, ends, keep, requests)

    # ------------------------------------------------------------------ memory
    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False) -> None:
        """`prefixes` replace what `owner` kept before; free cached work that extends nothing any
        live owner keeps (exact=True: keep the prefixes themselves, not what extends them)."""
        self._retained[owner] = [(list(p), exact) for p in prefixes]
        kept = [(p, e) for held in self._retained.values() for p, e in held]
        self.prefix_cache.retain([p for p, e in kept if not e], [p for p, e in kept if e])

    def claim(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False) -> None:
        """Register what `owner` keeps (as `retain` does) without freeing anything now."""
        self._retained[owner] = [(list(p), exact) for p in prefixes]

    def release(self, owner: Hashable) -> None:
        """An owner is done: what only it retained goes at the next `retain`."""
        self._retained.pop(owner, None)


def _by_length(batch: list[tuple[list[int], list[KV], int, Receipt]],
               min_saving: int) -> list[list[tuple[list[int], list[KV], int, Receipt]]]:
    """Contexts grouped so that padding their uncached tails to one width wastes less than a
    forward costs (`min_saving` tokens): sorted by tail length, a group grows while it can."""
    order = sorted(batch, key=lambda item: len(item[0]) - item[2])
    groups: list[list[tuple[list[int], list[KV], int, Receipt]]] = []
    for item in order:
        tail = len(item[0]) - item[2]
        if groups:
            group = groups[-1]
            waste = sum(tail - (len(c) - p) for c, _, p, _ in group)  # the group's rows padded to this tail
            if waste <= min_saving:
                group.append(item)
                continue
        groups.append([item])
    if len(groups) == 1:
        return [batch]  # one forward: keep the callers' row order
    return groups


def _option_probs(logits: torch.Tensor, ends: list[int], keep: list[int],
                  requests: Sequence[Score]) -> list[np.ndarray]:
    """Each request's option probabilities from the logits at its rows' last positions (`ends`,
    found among the kept positions); rows in request order, one per suffix."""
    last = logits[torch.arange(len(ends)), torch.tensor([keep.index(e) for e in ends])]
    probs = torch.softmax(last, dim=-1).cpu().numpy().astype(np.float64)
    out, start = [], 0
    for request in requests:
        block = probs[start:start + len(request.suffixes)]
        out.append(block[:, list(request.option_ids)])
        start += len(request.suffixes)
    return out


def top_tokens(logits: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n largest logits, largest first (ties: lower id first), as (token id, logit)."""
    values = logits.float().cpu().numpy().astype(np.float64)
    top = np.argsort(-values, kind="stable")[:n]
    return [(int(t), float(values[t])) for t in top]


__all__ = ["HFEngine", "context_window", "top_tokens"]
