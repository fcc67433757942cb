"""The Python API: load a model once, then generate many answers.

    from rain_llm import Rain, load_config
    rain = Rain.load()                                   # the bundled default model
    out = rain.generate("How do I pick a lock?", load_config("fast"))
    print(out.text, out.stats.iterations_per_step)
    plain = rain.generate("How do I pick a lock?", method="vanilla")

Every answer goes through one scheduler (`rain_llm.runtime.scheduler`), one prompt or many,
over the model's backend: here the transformers engine, `rain_llm.engine.hf`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rain_llm.config import RainConfig, check_speculate
from rain_llm.engine.hf.backend import HFBackend
from rain_llm.engine.hf.engine import HFEngine
from rain_llm.engine.hf.models import load_model
from rain_llm.errors import RainError
from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.answers import Answer, AnswerStats, Generation
from rain_llm.runtime.backend import Backend
from rain_llm.runtime.prompts import (
    TURN_MARKER,
    Prompt,
    PromptFormat,
    as_messages,
    chat_wrapper,
    has_chat_template,
    prompt_format,
    user_request,
)
from rain_llm.runtime.scheduler import Failure, Scheduler, Templates
from rain_llm.runtime.setup import Evaluator, ModelJudge, ProgressFn, Setup
from rain_llm.runtime.text import Codec, stop_ids
from rain_llm.values.embedder import EmbedderBackend, MiniLMEmbedder
from rain_llm.values.sources import CallableValue, ValueSource, build_value_source
from rain_llm.values.templates import SelfEvaluator, load_template

if TYPE_CHECKING:
    from rain_llm.engine.vllm import Remote

ValueArg = ValueSource | Callable[[str, str], float] | None
Item = tuple[Hashable, Prompt, RainConfig] | Answer  # what joins a continuous batch
Finished = Generation | Failure  # what leaves it

__all__ = ["Rain", "ContinuousBatch", "Generation", "AnswerStats", "Failure", "raise_failure"]


class Rain:
    """A model (and the sentence embedder) ready to answer prompts with RAIN, vanilla decoding or
    best-of-n. `model`: a transformers model, run in this process (the default backend); or None
    with `backend`, any other implementation of the backend interface (a remote engine), and
    `stop_ids`, the ids that end a turn. `speculate`: the most draft tokens (from text the search
    already produced) a decode row verifies per forward on the transformers engine; answers are the
    same with it on or off, only the number of forwards changes (0: off)."""

    def __init__(self, model: Any, tokenizer: Any, *, embedder: MiniLMEmbedder | None = None,
                 name: str = "model", backend: Backend | None = None, stop: Sequence[int] | None = None,
                 speculate: int = 0):
        if backend is None and model is None:
            raise RainError("Rain needs a model, or a backend that runs one")
        check_speculate(speculate, remote=backend is not None)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.codec = Codec(tokenizer, stop if stop is not None else stop_ids(model, tokenizer))
        if backend is None:
            backend = HFBackend(HFEngine(model, self.codec, speculate=speculate), name)
        self.backend: Backend = backend
        self._no_reuse: Backend | None = None
        self._embedder = embedder
        self._embedder_backend: EmbedderBackend | None = None
        self._value_sources: dict[tuple[Any, ...], ValueSource] = {}
        self._lock = threading.RLock()
        self.templates = Templates()

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
             device_map: str | None = None, speculate: int = 0) -> Rain:
        """Load a Hugging Face id, a local folder, a .gguf file, or (None) the bundled default."""
        check_speculate(speculate, remote=False)
        lm, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
        return cls(lm, tok, name=model or "default", speculate=speculate)

    @classmethod
    def connect(cls, urls: str | Sequence[str], tokenizer: str | None = None, *, key_env: str = "RAIN_ENGINE_KEY",
                name: str | None = None, timeout: float | None = None, isolate_scoring: bool | None = None,
                salt: str | None = None) -> Rain:
        """RAIN on the vLLM servers at `urls` (one model): the search, tokenizer and embedder here,
        the language model there. See `rain_llm.engine.vllm.open_servers` for the checks and options."""
        from rain_llm.engine.vllm import open_servers

        return cls.from_remote(open_servers(urls, tokenizer, key_env=key_env, name=name, timeout=timeout,
                                            isolate_scoring=isolate_scoring, salt=salt))

    @classmethod
    def from_remote(cls, remote: Remote) -> Rain:
        """A `Rain` over opened servers (one codec, so one tokenizer lock, for the backend and the API)."""
        rain = cls(None, remote.tokenizer, backend=remote.backend, stop=sorted(remote.codec.stop_ids),
                   name=remote.name)
        rain.codec = remote.codec
        return rain

    def speculating(self, speculate: int) -> Rain:
        """The same weights (and embedder) with caches of their own and `speculate` draft tokens per
        decode forward: for an A/B of speculation in one process (`rain bench` methods ending -sN)."""
        check_speculate(speculate, remote=self.model is None)
        return Rain(self.model, self.tokenizer, embedder=self._embedder, name=self.name, speculate=speculate,
                    stop=sorted(self.codec.stop_ids))

    @property
    def device(self) -> str:
        """Where local parts (the embedder, judge models) run: the model's device, else the CPU."""
        engine = getattr(self.backend, "engine", None)
        return str(engine.device) if engine is not None else "cpu"

    @property
    def embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:  # loaded on first RAIN call: vanilla decoding never needs it
            self._embedder = MiniLMEmbedder.load(device=self.device)
        return self._embedder

    def policy(self, cfg: RainConfig) -> Backend:
        """The backend that answers with `cfg`: the model's, or (reuse_cache off) a scope of it whose
        every call re-encodes its whole context, to measure what the cache saves."""
        if cfg.reuse_cache:
            return self.backend
        if self._no_reuse is None:
            self._no_reuse = self.backend.scope(reuse_cache=False)
        return self._no_reuse

    def value_source(self, cfg: RainConfig, value: ValueArg = None) -> ValueSource:
        """The value source for `cfg` (built once per setting and kept: judge models load once)."""
        if value is not None and hasattr(value, "bind"):
            return value  # type: ignore[return-value]
        if callable(value):
            return CallableValue(value)
        key = (cfg.value, cfg.template, cfg.eval_format, cfg.value_mode, cfg.reuse_cache)
        with self._lock:  # answers may be prepared on several threads (the server's handlers)
            return self._value_source(key, cfg)

    def _value_source(self, key: tuple[Any, ...], cfg: RainConfig) -> ValueSource:
        if key not in self._value_sources:
            chat = has_chat_template(self.tokenizer) if cfg.eval_format == "auto" else cfg.eval_format == "chat"
            if chat and not has_chat_template(self.tokenizer):
                raise RainError("eval_format=chat, but the tokenizer has no chat template")
            self._value_sources[key] = build_value_source(
                cfg.value, backend=self.policy(cfg), codec=self.codec, template=load_template(cfg.template),
                chat=chat, mode=cfg.value_mode, chat_template=chat_wrapper(self.tokenizer) if chat else None,
                device=self.device, load_judge=lambda name: Rain.load(name, device=self.device))
        return self._value_sources[key]

    def prepare(self, prompt: Prompt, cfg: RainConfig) -> tuple[PromptFormat, list[int]]:
        """The prompt's format and token ids, after the checks every method needs. A prompt is
        a user message, or a conversation (chat messages: system first, the last one the user's)."""
        as_messages(prompt)  # first: an empty prompt or a malformed conversation is the error to report
        fmt = prompt_format(self.tokenizer, cfg.prompt_format, cfg.fewshot)
        context = fmt.render(self.codec, prompt)
        window = self.backend.context_window
        if len(context) + cfg.max_new_tokens > window:
            raise RainError(f"prompt too long: {len(context)} tokens plus max_new_tokens={cfg.max_new_tokens} "
                            f"exceed the model's context window of {window}")
        return fmt, context

    def answer(self, key: Hashable, prompt: Prompt, cfg: RainConfig, *, value_fn: ValueArg = None,
               trace: bool = False, progress: ProgressFn | None = None, best_of_n: int | None = None,
               best_of_n_tokens: int | None = None) -> Answer:
        """An answer ready to join a scheduler: its prompt rendered and every setting checked
        (RainError naming the problem, before any work)."""
        cfg = cfg.validate()
        if best_of_n is not None and (not isinstance(best_of_n, int) or best_of_n < 1):
            raise RainError(f"invalid best_of_n {best_of_n!r}: a positive integer")
        if best_of_n_tokens is not None and (best_of_n is None or not isinstance(best_of_n_tokens, int)
                                             or best_of_n_tokens < 1):
            raise RainError(f"invalid best_of_n_tokens {best_of_n_tokens!r}: a positive integer, with best_of_n")
        fmt, context = self.prepare(prompt, cfg)
        policy = self.policy(cfg)
        if (refused := policy.refusal(cfg)) is not None:
            raise RainError(refused)
        setup = Setup(key, cfg, fmt, context, policy, self.codec, trace=trace, progress=progress,
                      best_of_n=best_of_n, best_of_n_tokens=best_of_n_tokens)
        if cfg.method == "rain" or best_of_n is not None:
            setup.evaluator = self.value_source(cfg, value_fn).bind(user_request(prompt))
            self._check_evaluation(setup.evaluator, cfg)
        if cfg.method == "rain" and best_of_n is None:
            setup.embedder = self.embedder_backend
            if isinstance(setup.evaluator, ModelJudge):
                setup.constant = setup.evaluator.constant_ids()  # kept cached once the answer joins a scheduler
        return Answer(setup)

    @property
    def embedder_backend(self) -> EmbedderBackend:
        with self._lock:
            if self._embedder_backend is None:
                self._embedder_backend = EmbedderBackend(self.embedder)
            return self._embedder_backend

    def _check_evaluation(self, evaluator: Evaluator, cfg: RainConfig) -> None:
        """The self-evaluation prompts must fit the judging model's context window."""
        if isinstance(evaluator, SelfEvaluator):
            window = evaluator.backend.context_window
            eval_len = len(evaluator.prefix_ids("")) + max(len(s) for s in evaluator.suffix_ids)
            if eval_len + cfg.max_new_tokens + cfg.max_rollout_tokens > window:
                raise RainError(f"prompt too long: its self-evaluation prompt ({eval_len} tokens) plus the "
                                f"answer budget exceeds the model's context window of {window}")

    def continuous_batch(self) -> ContinuousBatch:
        """Answers that join and leave a running batch (see ContinuousBatch)."""
        return ContinuousBatch(self)

    def generate(self, prompt: Prompt, config: RainConfig | None = None, *, trace: bool = False,
                 progress: ProgressFn | None = None, value_fn: ValueArg = None, best_of_n: int | None = None,
                 best_of_n_tokens: int | None = None, **overrides: Any) -> Generation:
        """Answer `prompt` with `config.method` ("rain" or "vanilla"), or best-of-n with `best_of_n`
        samples (with `best_of_n_tokens`: at most that many, sampled until the answer has processed
        about that many LM tokens, to match another method's compute); overrides change config keys.
        `value_fn` replaces what steers the search (default: `config.value`, the model's
        self-evaluation)."""
        return self.generate_many([prompt], config, trace=trace, progress=progress, value_fn=value_fn,
                                  best_of_n=best_of_n, best_of_n_tokens=best_of_n_tokens, **overrides)[0]

    def generate_many(self, prompts: Sequence[Prompt], config: RainConfig | None = None, *, trace: bool = False,
                      progress: ProgressFn | None = None, value_fn: ValueArg = None,
                      best_of_n: int | None = None, best_of_n_tokens: int | None = None,
                      **overrides: Any) -> list[Generation]:
        """Answer several prompts at once, same settings for all, in one scheduler: their model calls
        (expansions, evaluations, embeddings) are batched across prompts, a token at a time, each
        answer moving on as soon as its own rows are done. Each answer's stats hold its own share of
        the work (`compute`) and, with several prompts, the whole batch's (`batch_compute`). An answer
        that fails raises its error (the others were answered as if it had never come)."""
        cfg = config or RainConfig()
        cfg = cfg.replace(**overrides) if overrides else cfg.validate()
        if not isinstance(prompts, list | tuple) or not prompts:
            raise RainError("no prompts: give at least one")
        scheduler: Scheduler[Generation] = Scheduler(self.templates)
        answers = [self.answer(i, p, cfg, value_fn=value_fn, trace=trace, best_of_n=best_of_n,
                               best_of_n_tokens=best_of_n_tokens, progress=progress if len(prompts) == 1 else None)
                   for i, p in enumerate(prompts)]  # every prompt checked before any work
        for answer in answers:
            scheduler.add(answer)
        done = scheduler.run()
        out = [raise_failure(done[i]) for i in range(len(prompts))]
        if len(out) > 1:
            whole = Compute.merged(answer.compute for answer in answers)
            for generation in out:
                generation.stats.batch_compute = whole
        return out


@dataclass
class Round:
    """What one step of `ContinuousBatch.drain` did: the answers that joined before it (`started`)
    and those that ended (`finished`: a `Generation`, or the `Failure` of that answer alone)."""

    started: list[Hashable]
    finished: dict[Hashable, Finished]


class ContinuousBatch:
    """Answers that join a running batch and leave it when done (continuous batching, what a
    server needs). `add` starts an answer, `step` runs one step of every answer in flight and
    returns those that ended (a `Generation`, or the `Failure` of that answer alone); `drain`
    keeps a batch full from a stream of items. Answers may differ in settings and methods. Each
    answer equals `Rain.generate`'s: it draws from its own random stream and its compute is its
    own share.

        batch = rain.continuous_batch()
        for step in batch.drain(((i, p, cfg) for i, p in enumerate(prompts)), max_in_flight=8):
            for key, out in step.finished.items(): ...
    One batch at a time per Rain: the answers share the model's cache.
    """

    def __init__(self, rain: Rain):
        self.rain = rain
        self.scheduler: Scheduler[Generation] = Scheduler(rain.templates)

    def __len__(self) -> int:
        return len(self.scheduler)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.scheduler

    def add(self, key: Hashable, prompt: Prompt, config: RainConfig, *, value_fn: ValueArg = None) -> None:
        """Start answering `prompt`. Raises RainError (and starts nothing) for a bad prompt or setting."""
        self.add_many([(key, prompt, config)], value_fn=value_fn)

    def add_many(self, items: Sequence[tuple[Hashable, Prompt, RainConfig]], *, value_fn: ValueArg = None) -> None:
        """Start several answers, (key, prompt, settings) each; their prompts and evaluation prompts
        are encoded together in the next step. Every item is checked first: one bad item raises
        RainError and none starts."""
        keys = [key for key, _, _ in items]
        for key in keys:
            if key in self.scheduler or keys.count(key) > 1:
                raise RainError(f"answer {key!r} is already in the batch")
        answers = [self.rain.answer(key, prompt, config, value_fn=value_fn) for key, prompt, config in items]
        for answer in answers:
            self.scheduler.add(answer)

    def add_answer(self, answer: Answer) -> None:
        """Start an answer prepared elsewhere (`Rain.answer`: e.g. on a server's request thread)."""
        self.scheduler.add(answer)

    def step(self) -> dict[Hashable, Finished]:
        """One step of every answer in flight; the answers that ended."""
        return self.scheduler.step()

    def drain(self, items: Iterable[Item | None], max_in_flight: int) -> Iterator[Round]:
        """Answer `items` with at most `max_in_flight` in flight: whenever there is room, the next
        items join (together, so their prompts are encoded in one forward); after every step, a
        `Round`: the answers that joined before it and those that ended in it. An item that cannot
        start ends at once as its `Failure` (and is not among those that joined). An item of None
        means "nothing more for now" (a server's line is empty): the batch steps on with what it
        has. Ends when `items` is exhausted and nothing is in flight. Between rounds the caller may
        `stop`, `cancel` or read `partial_text` of any answer."""
        if max_in_flight < 1:
            raise RainError(f"invalid max_in_flight {max_in_flight}: at least 1")
        source = iter(items)
        exhausted = False
        while True:
            now = Round([], {})
            while not exhausted and len(self) < max_in_flight:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                elif item is None:
                    break
                else:
                    self._start(item, now)  # type: ignore[arg-type]
            if not self and exhausted:
                if now.finished:
                    yield now
                return
            if self:
                now.finished |= self.step()
            yield now

    def _start(self, item: Item, now: Round) -> None:
        key = item.key if isinstance(item, Answer) else item[0]
        try:
            if isinstance(item, Answer):
                self.add_answer(item)
            else:
                self.add(*item)
        except Exception as err:  # noqa: BLE001 - this item fails alone (a bad setting, or a bug: status 500)
            now.finished[key] = Failure(key, err)
        else:
            now.started.append(key)

    def stop(self, key: Hashable) -> Finished | None:
        """End an answer now (a deadline) with what it committed so far; None if it is not here."""
        return self.scheduler.stop(key)

    def cancel(self, key: Hashable) -> None:
        """Drop an answer that is no longer wanted: its search stops and its cache may go."""
        self.scheduler.cancel(key)

    def partial_text(self, key: Hashable) -> str | None:
        """The text a live answer has committed so far, held back where it may still change (an
        unfinished character; a transcript's possible start of a new turn). RAIN never revises a
        commit and greedy decoding keeps its tokens, so the final text starts with it. None for
        answers that commit nothing before they end (best-of-n) or are not here."""
        job = self.scheduler.jobs.get(key)
        if not isinstance(job, Answer) or (job.search is None and job.method != "vanilla"):
            return None
        text = job.setup.text(job.committed())
        if not job.setup.fmt.chat:
            text = text[:max(0, len(text) - len(TURN_MARKER))]
        return text.rstrip("\ufffd")


_END = object()


def raise_failure(finished: Finished) -> Generation:
    """An answer's generation, or its error raised (the CLI prints it as one line)."""
    if isinstance(finished, Failure):
        raise finished.error
    return finished
