"""Token-level continuous batching on the transformers engine: rows join and leave between forwards.

Each `step` samples one token for every row that has logits, then runs one forward for all rows
still going; a row that stops leaves at once (its KV goes to the prefix tree) and a request
returns as soon as its own rows are done, not when the longest row of the batch is. So searches
sharing an engine need not wait for each other's longest rollout: the number of sequential
forward passes, what a GPU pays for, stays close to that of the busiest search.

Layout: one left-padded buffer, every slot's last token at the same column; it is rebuilt (one
index_select per layer for the slots that go on, one copy per joining context) when rows join,
leave or branch, and trimmed to the longest live slot then. Rows holding the same tokens share a
slot, also across requests that join with the same context (a leaf's candidates and its rollout).
A joining context whose last token alone is uncached (a leaf whose token set was just sampled)
feeds that token in the step's forward instead of a forward of its own.

Exact speculation (`HFEngine.speculate` > 0): a slot feeds, after its token, a draft of what the
prefix tree already holds after its tokens (an earlier rollout or token set from the same node), or
else of what followed its last three tokens in a row decoded earlier (a phrase a sibling's rollout
used), and keeps the logits of every fed position. At the next step each row picks position by
position with its own uniforms, as it would have one token per forward, and goes on while its pick
equals the draft: a row's tokens are the same with speculation on or off (`sample` is Gumbel-max for
that). The KV of a slot's rejected draft tokens is cut off (the buffer is truncated, or rebuilt
without it when slots keep different lengths).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import DynamicCache

from rain_llm.engine.hf.cache import KV, BufferLayer, buffered, buffers, cache_kv, concat
from rain_llm.errors import RainError
from rain_llm.runtime.accounting import Receipt
from rain_llm.runtime.backend import Row, Sample, TextStop

if TYPE_CHECKING:
    from rain_llm.engine.hf.engine import HFEngine


class _Context:
    """A context that requests join with in one step (they share its KV copy and its tail slot)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.segments: list[KV] = []  # its cached KV chunks (batch 1), while joining
        self.tail: int | None = None  # its last token, when only it is uncached

    def length(self) -> int:
        return sum(kv[0][0].shape[-2] for kv in self.segments)


class _Request:
    """Rows of one `DecodeStream.join`: their tokens so far and what they sample with."""

    def __init__(self, key: Hashable, context: list[int], rows: Sequence[Row], u: np.ndarray, receipt: Receipt,
                 want_logits: bool):
        self.key, self.context, self.rows, self.u, self.receipt = key, context, list(rows), u, receipt
        self.tokens: list[list[int]] = [[] for _ in self.rows]
        self.logprob = [0.0] * len(self.rows)
        self.left = len(self.rows)  # rows not done yet
        self.ctx = _Context(context)  # shared with every request joining with the same context, once admitted
        self.want_logits = want_logits
        self.first_logits: torch.Tensor | None = None  # the logits after the context (if wanted)

    def samples(self) -> list[Sample]:
        return [Sample(t, lp) for t, lp in zip(self.tokens, self.logprob)]


class _LiveRow:
    """A row decoding now: its batch slot; the logits [1 + len(draft), vocab] after its last fed
    token and after each draft token fed behind it; and, once it picked, `cut`: the columns at the
    end of its slot that are not its own (a rejected draft, padding)."""

    __slots__ = ("request", "r", "slot", "logits", "draft", "cut")

    def __init__(self, request: _Request, r: int, slot: int, logits: torch.Tensor | None):
        self.request, self.r, self.slot, self.logits = request, r, slot, logits
        self.draft: list[int] = []
        self.cut = 0


class _Source:
    """A slot of the next forward: copied from an old slot (its KV less `cut` last columns) or from a
    joining context; it feeds `token`, then `draft`; its work is charged to `receipt`."""

    __slots__ = ("parent", "cut", "ctx", "token", "receipt", "context", "fed", "limit", "draft")

    def __init__(self, parent: int, cut: int, ctx: _Context | None, token: int, receipt: Receipt,
                 context: list[int], fed: list[int], limit: int):
        self.parent, self.cut, self.ctx, self.token, self.receipt = parent, cut, ctx, token, receipt
        self.context, self.fed, self.limit = context, fed, limit  # its tokens; the most draft tokens it can use
        self.draft: list[int] = []


class _Recent:
    """What followed each run of `n` tokens in the rows this stream decoded (the latest wins): drafts
    for a row whose exact prefix the tree has not seen, e.g. a rollout repeating a sibling's phrase.
    Cleared when it holds `size` runs, so memory stays bounded."""

    def __init__(self, n: int = 3, size: int = 1 << 16):
        self.n, self.size = n, size
        self.after: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}

    def add(self, tokens: Sequence[int]) -> None:
        if len(self.after) > self.size:
            self.after.clear()
        seq = tuple(tokens)
        for i in range(self.n, len(seq)):
            self.after[seq[i - self.n:i]] = (seq, i)

    def draft(self, tokens: Sequence[int], limit: int) -> list[int]:
        found = self.after.get(tuple(tokens[-self.n:])) if len(tokens) >= self.n else None
        return list(found[0][found[1]:found[1] + limit]) if found is not None else []


class DecodeStream:
    """Rows that decode side by side and join or leave between forward passes (module docstring)."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.cache: DynamicCache | None = None
        self.pads: list[int] = []  # per slot: left padding
        self.live: list[_LiveRow] = []
        self.joining: list[_Request] = []
        self.requests: dict[Hashable, _Request] = {}
        self._slot_receipt: list[Receipt] = []  # whose work each slot is
        self._width = 1  # positions each slot fed in the last forward (1 + the longest draft)
        self.recent = _Recent()

    def __len__(self) -> int:
        return len(self.requests)

    def join(self, key: Hashable, context: Sequence[int], rows: Sequence[Row], uniforms: np.ndarray | None,
             receipt: Receipt, *, want_logits: bool = False) -> None:
        """Start decoding `rows` after `context` at the next step (`uniforms[r, step]`: row r's
        inverse-CDF draws; None draws them from the engine's generator); the work is charged to
        `receipt`. `want_logits` keeps the logits after the context (`_Request.first_logits`)."""
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
        request = _Request(key, list(context), rows, u, receipt, want_logits)
        self.requests[key] = request
        self.joining.append(request)

    def cancel(self, key: Hashable) -> None:
        """Stop a request's rows (its slots go at the next step)."""
        request = self.requests.pop(key, None)
        if request is not None:
            self.joining = [r for r in self.joining if r is not request]
            self.live = [row for row in self.live if row.request is not request]

    @torch.inference_mode()
    def step(self) -> dict[Hashable, _Request]:
        """Admit joining requests, sample one token per row, run one forward; the requests done."""
        ready = self._admit()
        picking = self.live + ready
        finished: dict[Hashable, _Request] = {}
        going: list[_LiveRow] = []
        leaving: dict[int, tuple[_Request, list[tuple[list[int], int, torch.Tensor, int]]]] = {}
        accepted: dict[int, int] = {}  # per slot: the most draft tokens a row of it accepted
        if picking:
            chosen = self._pick(picking)
            stops = self.engine.stop_ids
            for row, picks in zip(picking, chosen):
                request, r = row.request, row.r
                tokens = request.tokens[r]
                logits = _logits(row)
                if request.want_logits and request.first_logits is None:
                    request.first_logits = logits[0]
                spec = request.rows[r]
                width = self._width if row.slot >= 0 else 1  # a row that joins picks from cached logits
                for j, (token, lp) in enumerate(picks):  # position j follows the row's j-th draft token
                    tokens.append(token)
                    request.logprob[r] += lp
                    row.cut = width - 1 - j  # columns fed after the row's last token now
                    if row.slot >= 0 and j:
                        accepted[row.slot] = max(accepted.get(row.slot, 0), j)
                    if (token in stops or len(tokens) >= spec.max_tokens
                            or (spec.stop is not None and self._text_stops(spec.stop, tokens))):
                        request.left -= 1
                        if self.engine.speculate:
                            self.recent.add(request.context[-self.recent.n:] + tokens)
                        if row.slot >= 0:  # fed tokens are in the buffer: keep them in the prefix tree
                            leaving.setdefault(id(request), (request, []))[1].append(
                                (tokens[:-1], row.slot, logits[j], row.cut))
                        if request.left == 0:
                            finished[request.key] = request
                        break
                    if j >= len(row.draft) or token != row.draft[j]:  # the draft ends or is rejected here
                        going.append(row)
                        break
        for slot in {row.slot for row in picking if row.slot >= 0}:  # what one token per forward would not have fed
            receipt, n = self._slot_receipt[slot], accepted.get(slot, 0)
            receipt.accepted += n
            receipt.speculated += self._width - 1 - n
        for request, rows in leaving.values():
            self._store(request, rows)
        for key in finished:
            del self.requests[key]
        joining, self.joining = self.joining, []
        self._advance(going, joining)
        return finished

    def _text_stops(self, stop: TextStop, tokens: list[int]) -> bool:
        text = self.engine.decode(list(stop.lookbehind) + tokens)
        return (bool(text) and text[-1] in stop.chars) or any(marker in text for marker in stop.markers)

    def _admit(self) -> list[_LiveRow]:
        """Find each joining context's KV (requests with the same context share it); the rows of
        those fully cached (logits known) pick now, the others feed their last token in this
        step's forward. Rows of one context are kept together (their slots are copied at once)."""
        engine, ready = self.engine, list[_LiveRow]()
        if not self.joining:
            return ready
        groups: dict[tuple[int, ...], list[_Request]] = {}
        for request in self.joining:
            groups.setdefault(tuple(request.context), []).append(request)
        for requests in groups.values():
            ctx = _Context(requests[0].context)
            for request in requests:
                request.ctx = ctx
        if engine.reuse_cache:
            long = [rs[0] for rs in groups.values()
                    if not 0 < engine.prefix_cache.lookup(rs[0].context)[2] >= len(rs[0].context) - 1]
            if long:  # more than the last token uncached: one batched forward for those
                engine.encode_many([r.context for r in long], [r.receipt for r in long])
            for requests in groups.values():
                ctx = requests[0].ctx
                path, _, pos, logits = engine.prefix_cache.lookup(ctx.tokens)
                ctx.segments = [c.kv for c in path if c.kv is not None]  # captured now: later lookups split
                if logits is None:
                    ctx.tail = ctx.tokens[-1]
                else:
                    ready += _rows(requests, logits)
        else:
            for requests in groups.values():
                ctx = requests[0].ctx
                cache, logits = engine.prefill(ctx.tokens, requests[0].receipt)
                ctx.segments = [cache_kv(cache, 0, len(ctx.tokens))]
                ready += _rows(requests, logits)
        return ready

    def _pick(self, rows: list[_LiveRow]) -> list[list[tuple[int, float]]]:
        """Per row, a token at each of its fed positions (one, or one more than its draft), each by
        the row's own rule and the uniform of the token's own step (grouped by rule, one call each)."""
        counts = [min(_logits(row).shape[0], row.request.rows[row.r].max_tokens - len(row.request.tokens[row.r]))
                  for row in rows]  # a row sharing a slot with longer rows uses no more than it may decode
        logits = torch.cat([_logits(row)[:n] for row, n in zip(rows, counts)])
        steps = [(row, len(row.request.tokens[row.r]) + j) for row, n in zip(rows, counts) for j in range(n)]
        u = torch.from_numpy(np.array([row.request.u[row.r, step] for row, step in steps]))
        greedy = torch.tensor([row.request.rows[row.r].greedy for row, _ in steps])
        by_rule: dict[tuple[float, int], list[int]] = {}
        for i, (row, _) in enumerate(steps):
            spec = row.request.rows[row.r]
            by_rule.setdefault((spec.temperature, spec.top_k), []).append(i)
        if len(by_rule) == 1:
            ((temperature, top_k),) = by_rule
            tokens, logprob = sample(logits, temperature, top_k, u, greedy)
        else:
            tokens = torch.zeros(len(steps), dtype=torch.long)
            logprob = torch.zeros(len(steps), dtype=torch.float64)
            for (temperature, top_k), idx in by_rule.items():
                index = torch.tensor(idx)
                tokens[index], logprob[index] = sample(logits[index.to(logits.device)], temperature, top_k,
                                                       u[index], greedy[index])
        picks = list(zip(tokens.tolist(), logprob.tolist()))
        out, start = [], 0
        for n in counts:
            out.append(picks[start:start + n])
            start += n
        return out

    def _store(self, request: _Request, rows: list[tuple[list[int], int, torch.Tensor, int]]) -> None:
        """Rows of one request leaving together: each fed its tokens up to `cut` columns before the
        buffer's end (rows that fed as many tokens and cut as many are stored with one copy)."""
        engine = self.engine
        if not engine.reuse_cache or self.cache is None:
            return
        _, node, pos, _ = engine.prefix_cache.lookup(request.context)
        if pos == len(request.context):
            end = buffers(self.cache)[0].length
            groups: dict[tuple[int, int], list[tuple[list[int], int, torch.Tensor]]] = {}
            for tokens, slot, logits, cut in rows:
                groups.setdefault((len(tokens), cut), []).append((tokens, slot, logits))
            for (fed, cut), same in groups.items():
                engine.store(node, same, self.cache, end - cut - fed)

    def _advance(self, going: list[_LiveRow], joining: list[_Request]) -> None:
        """New slots for the rows that go on (rows with the same parent slot and cut, or the same
        joining context, and the same token share one) and for joining contexts that feed their last
        token; drafts for them (speculation on); one forward over them."""
        engine = self.engine
        sources: list[_Source] = []
        index: dict[tuple[int, int, int, int], int] = {}
        for row in sorted(going, key=lambda row: row.slot >= 0, reverse=True):  # slots from the buffer first
            parent = row.slot if row.slot >= 0 else -1
            cut = row.cut if parent >= 0 else 0
            request, tokens = row.request, row.request.tokens[row.r]
            key = (parent, cut, id(request.ctx) if parent < 0 else 0, tokens[-1])
            room = request.rows[row.r].max_tokens - len(tokens) - 1  # the most draft tokens it can use
            if key not in index:  # the slot's work is charged to a request still going (never one done)
                index[key] = len(sources)
                sources.append(_Source(parent, cut, request.ctx if parent < 0 else None, tokens[-1], request.receipt,
                                       request.context, tokens, room))
            source = sources[index[key]]
            source.limit = max(source.limit, room)
            row.slot = index[key]
        tail_slot: dict[int, int] = {}
        tails: list[_Context] = []
        tail_rows: list[_LiveRow] = []
        for request in joining:
            if request.ctx.tail is not None:
                room = max(spec.max_tokens for spec in request.rows) - 1
                if id(request.ctx) not in tail_slot:
                    tail_slot[id(request.ctx)] = len(sources)
                    tails.append(request.ctx)
                    sources.append(_Source(-1, 0, request.ctx, request.ctx.tail, request.receipt, request.ctx.tokens,
                                           [], room))
                source = sources[tail_slot[id(request.ctx)]]
                source.limit = max(source.limit, room)
                tail_rows += [_LiveRow(request, r, tail_slot[id(request.ctx)], None) for r in range(len(request.rows))]
        self.live = going + tail_rows
        if not sources:
            self.cache, self.pads, self._slot_receipt = None, [], []
            return
        if engine.speculate:  # the tree's text after exactly these tokens, else what followed their last few
            for source in sources:
                limit, sequence = min(engine.speculate, source.limit), source.context + source.fed
                source.draft = ((engine.prefix_cache.continuation(sequence, limit) if engine.reuse_cache else [])
                                or self.recent.draft(sequence, limit))
        width = 1 + max(len(source.draft) for source in sources)
        room = max(width, 1 + max((row.request.rows[row.r].max_tokens - len(row.request.tokens[row.r])
                                   for row in self.live), default=0))
        self._rebuild(sources, room, width)
        self._width = width
        ids = torch.tensor([[s.token, *s.draft] + [s.token] * (width - 1 - len(s.draft)) for s in sources])
        out, self.cache = engine.forward(ids, self.cache, keep=width, pads=self.pads, receipts=self._slot_receipt)
        for source in sources:
            source.receipt.drafted += len(source.draft)
        for row in self.live:
            source = sources[row.slot]
            row.logits, row.draft = out[row.slot, :1 + len(source.draft)], source.draft
        for ctx in tails:  # the context's last token is computed now: keep it with its logits
            if engine.reuse_cache:
                slot, column = tail_slot[id(ctx)], buffers(self.cache)[0].length - width
                engine.keep_tail(ctx.tokens, len(ctx.tokens) - 1, self.cache, column, slot, out[slot, 0])
            ctx.tail, ctx.segments = None, []

    def _rebuild(self, sources: list[_Source], room: int, width: int) -> None:
        """The buffer for the next forward (of `width` positions): each new slot copies an old slot
        (less its cut columns) or a joining context, left-padded to the longest, with `room` more
        columns; kept as it is (truncated by a cut all share) when every old slot goes on in place
        and there is room."""
        old = buffers(self.cache) if self.cache is not None else None
        col = old[0].length if old is not None else 0
        parents = [s.parent for s in sources]
        self._slot_receipt = [s.receipt for s in sources]
        cuts = {s.cut for s in sources}
        if (old is not None and parents == list(range(old[0].kbuf.shape[0])) and len(cuts) == 1
                and col - min(cuts) + width <= old[0].kbuf.shape[2]):
            if min(cuts):
                for buf in old:
                    buf.truncate(col - min(cuts))
            return
        lengths = [col - s.cut - self.pads[s.parent] if s.parent >= 0 else _joining(s.ctx).length() for s in sources]
        span = max(lengths)
        kept = [s for s in sources if s.parent >= 0]
        alloc = torch.zeros if any(n < span for n in lengths) else torch.empty  # padding must be finite
        first = _joining(next((s.ctx for s in sources if s.parent < 0), None)) if old is None else None
        by_cut: dict[int, list[int]] = {}  # kept slots (their new index) grouped by the columns they cut
        for i, s in enumerate(kept):
            by_cut.setdefault(s.cut, []).append(i)
        layers = []
        for layer in range(len(old) if old is not None else len(_joining(first).segments[0])):
            if old is not None:
                k0, v0 = old[layer].kbuf, old[layer].vbuf
            else:
                k0, v0 = _joining(first).segments[0][layer]  # shapes, dtype, device
            shape = (len(sources), k0.shape[1], span + room, k0.shape[3])
            kbuf = alloc(shape, dtype=k0.dtype, device=k0.device)
            vbuf = alloc((*shape[:3], v0.shape[3]), dtype=v0.dtype, device=v0.device)
            for cut, slots in by_cut.items():  # one copy per layer for the slots that cut alike
                n, end = max(lengths[i] for i in slots), col - cut
                index = torch.tensor([kept[i].parent for i in slots], device=k0.device)
                new = slice(0, len(kept)) if len(by_cut) == 1 else torch.tensor(slots, device=k0.device)
                kbuf[new, :, span - n:span] = k0[:, :, end - n:end].index_select(0, index)
                vbuf[new, :, span - n:span] = v0[:, :, end - n:end].index_select(0, index)
            slot = len(kept)
            while slot < len(sources):  # a joining context's slots are consecutive: one copy for them
                ctx, end = _joining(sources[slot].ctx), slot
                while end < len(sources) and sources[end].ctx is ctx:
                    end += 1
                n = lengths[slot]
                kbuf[slot:end, :, span - n:span] = concat(ctx.segments, layer, 0)
                vbuf[slot:end, :, span - n:span] = concat(ctx.segments, layer, 1)
                slot = end
            layers.append(BufferLayer(kbuf, vbuf, span))
        self.cache = buffered(layers)
        self.pads = [span - n for n in lengths]


def _joining(ctx: _Context | None) -> _Context:
    if ctx is None:
        raise RuntimeError("engine bug: a new slot without its context")
    return ctx


def _logits(row: _LiveRow) -> torch.Tensor:
    if row.logits is None:
        raise RuntimeError("engine bug: a row picks before its logits are computed")
    return row.logits


def _rows(requests: list[_Request], logits: torch.Tensor) -> list[_LiveRow]:
    """The rows of requests that join with their context's logits known: they pick at once."""
    return [_LiveRow(request, r, -1, logits.unsqueeze(0)) for request in requests for r in range(len(request.rows))]


def sample(logits: torch.Tensor, temperature: float, top_k: int, u: torch.Tensor,
           greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the logits warped by temperature then top-k (the official logits
    processors' order), by the Gumbel-max trick with noise drawn from a generator seeded by the row's
    uniform `u` (same u -> same noise -> same token), or the most likely token for greedy rows; with
    its log probability under the warped distribution. The noise is one value per vocabulary id, or
    per rank among the top k. Runs where `logits` live; returns CPU tensors (tokens long, log
    probabilities float64).

    Why Gumbel-max rather than an inverse CDF: a forward of another shape (another batch, a verified
    draft) changes logits in their last bits. An inverse CDF over the whole vocabulary then picks
    another token whenever u falls within that noise of any of its ~50,000 boundaries (measured: a
    rollout on the default model flipped between two tokens of probability 2e-7 each); the argmax of
    perturbed logits changes only when its two best entries are that close."""
    scaled = logits / temperature
    vocab_ids = None
    if 0 < top_k < scaled.shape[-1]:
        scaled, vocab_ids = torch.topk(scaled, top_k, dim=-1)  # descending: column 0 is the argmax
    scaled = scaled.double()
    col = torch.argmax(scaled + gumbel_noise(u, scaled.shape[-1], scaled.device, skip=greedy), dim=-1)
    if greedy.any():
        col = torch.where(greedy.to(col.device), torch.argmax(scaled, dim=-1), col)
    logprob = torch.log_softmax(scaled, dim=-1).gather(1, col.view(-1, 1)).squeeze(1)
    tokens = vocab_ids.gather(1, col.view(-1, 1)).squeeze(1) if vocab_ids is not None else col
    return tokens.cpu(), logprob.cpu()


_generators: dict[torch.device, torch.Generator] = {}


def gumbel_noise(u: torch.Tensor, n: int, device: torch.device, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Standard Gumbel noise [rows, n] (float64), row i drawn from a generator seeded with the 32
    leading bits of u[i]: a fixed function of the uniform on one device, whatever the batch. Rows
    where `skip` is true (greedy ones) get a constant instead (nothing is drawn for them)."""
    generator = _generators.setdefault(device, torch.Generator(device=device))
    out = torch.full((len(u), n), 0.5, device=device)
    skipped = skip.tolist() if skip is not None else [False] * len(u)
    for i, seed in enumerate((u.double() * 2.0 ** 32).long().clamp(0, 2 ** 32 - 1).tolist()):
        if not skipped[i]:
            torch.rand(n, generator=generator.manual_seed(seed), device=device, out=out[i])
    return -torch.log(-torch.log(out.double() + 2.0 ** -25))
