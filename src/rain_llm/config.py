"""Every RAIN hyperparameter in one dataclass, with the paper's defaults and their source.

Sources: "paper" = Li et al., RAIN, ICLR 2024; "official" = SafeAILab/RAIN
(``HH/main.py``, ``adv/main.py``, ``truth/main.py``, ``*/nodes.py``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rain_llm.errors import RainError

METHODS = ("rain", "vanilla")
VALUE_MODES = ("vote", "mean")
FORMATS = ("auto", "chat", "raw")


@dataclass
class RainConfig:
    """Search and decoding settings. Defaults reproduce the paper's HH setting."""

    method: str = "rain"  # "rain" or "vanilla"
    max_new_tokens: int = 128  # answer budget (official: maxlen = 2048 for prompt + answer)

    # --- expansion: token sets and their candidates
    token_set_lengths: tuple[int, ...] = (1, 2, 4, 10)  # official getmaxnew(): 1, 2, 4, then 10
    num_candidates: int = 10  # official group_getp(topk=10): k candidate token sets per leaf
    sample_attempts: int = 9  # official HH: range(topk - 1) sampled sets; adv: 2 * topk - 1 = 19
    top_k: int = 15  # official getp(topk=15) when sampling token sets
    temperature: float = 1.0  # official HH 1.0, adv 2.0
    root_prior_mix: float = 0.25  # official: root priors 0.75 * p + 0.25 * uniform

    # --- selection (PUCT)
    c_puct: float = 2.0  # official nodes.py getqu(): cpuct = 2
    q_min_init: float = -1.0  # official: root.minqn = -1
    q_max_init: float = 1.0  # official: root.maxqn = 1

    # --- simulation before evaluation
    rollout_stop_chars: str = ",.?:;\n"  # official simg(): stop at , . ? : ; newline
    max_rollout_tokens: int = 64  # ours: the official code has no bound short of maxlen
    rollout_temperature: float = 1.0  # official simg(): full distribution, temperature 1 (ours: 0 = greedy)

    # --- self-evaluation
    value: str = "self"  # what steers: self, judge:MODEL, reward:MODEL, vader, afinn (see values.py)
    template: str = "harmlessness"  # built-in name or path to a template .toml file
    value_mode: str = "vote"  # "vote": official binary vote of both orders; "mean": mean probability
    eval_format: str = "auto"  # "chat" wraps the evaluation in the chat template; "raw" does not

    # --- rewind: similarity updates and dynamic node addition
    similarity_threshold: float = 0.95  # official nodes.py: sim_the = 0.95
    similarity_gamma: float = 0.2  # official nodes.py: sim_gamma = 0.2
    dynamic_max_children: int = 20  # official checkadd(): nc < 20
    dynamic_variance_scale: float = 0.03  # official checkadd(): norm(var) < 0.03 * len(tokens)
    dynamic_q_threshold: float = 0.0  # official checkadd(): max child q < 0
    dynamic_extra_samples: int = 2  # official: group_getp(topk=2) when adding

    # --- outer loop
    t_min: int = 6  # official HH minT = 6 (adv 5, truth 16)
    t_max: int = 50  # official maxT = 50
    value_threshold: float = 0.8  # official Vt = 0.8
    fresh_iterations: int = 15  # official: range(initi, max(maxT, initi + 15))
    parallel_leaves: int = 1  # ours: leaves selected per round with virtual loss (1 = the paper's loop)
    max_search_tokens: int = 0  # ours: budget per answer in LM tokens processed (0: none); then the best
    max_search_seconds: float = 0.0  # path so far is committed and the answer finished plainly (0: none)

    # --- prompting and run
    prompt_format: str = "auto"  # "chat" (chat template), "raw" (Human:/Assistant: transcript)
    fewshot: str = ""  # transcript preamble: "" none, "default" our examples, or a file path
    seed: int = 0
    reuse_cache: bool = True  # False: every call re-encodes its whole context (to measure the saving)

    def validate(self) -> RainConfig:
        """Raise RainError naming the first invalid value; return self for chaining."""

        def bad(name: str, why: str) -> RainError:
            return RainError(f"invalid config value {name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"expected one of {', '.join(METHODS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
        if self.seed < 0:
            raise bad("seed", "must not be negative")
        for name in ("max_new_tokens", "num_candidates", "top_k", "t_max", "max_rollout_tokens",
                     "dynamic_extra_samples", "parallel_leaves"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("sample_attempts", "t_min", "fresh_iterations", "dynamic_max_children", "max_search_tokens",
                     "max_search_seconds"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.t_min > self.t_max:
            raise RainError(f"invalid config: t_min={self.t_min} is greater than t_max={self.t_max}")
        if not self.token_set_lengths or any(n < 1 for n in self.token_set_lengths):
            raise bad("token_set_lengths", "needs at least one length, each at least 1")
        if not self.temperature > 0:
            raise bad("temperature", "must be positive")
        if not self.rollout_temperature >= 0:
            raise bad("rollout_temperature", "must not be negative (0: greedy rollouts)")
        for name in ("c_puct", "similarity_gamma", "dynamic_variance_scale"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if not 0 <= self.root_prior_mix <= 1:
            raise bad("root_prior_mix", "must be in [0, 1]")
        if not -1 <= self.similarity_threshold <= 1:
            raise bad("similarity_threshold", "must be a cosine similarity in [-1, 1]")
        if not self.q_min_init < self.q_max_init:
            raise RainError("invalid config: q_min_init must be less than q_max_init")
        if self.value_mode not in VALUE_MODES:
            raise bad("value_mode", f"expected one of {', '.join(VALUE_MODES)}")
        if self.eval_format not in FORMATS:
            raise bad("eval_format", f"expected one of {', '.join(FORMATS)}")
        if self.prompt_format not in FORMATS:
            raise bad("prompt_format", f"expected one of {', '.join(FORMATS)}")
        if not (self.value in ("self", "vader", "afinn") or self.value.startswith(("judge:", "reward:"))):
            raise bad("value", "expected self, judge:MODEL, reward:MODEL, vader or afinn")
        if not self.template:
            raise bad("template", "must name a built-in template or a file")
        return self

    def replace(self, **changes: Any) -> RainConfig:
        """A copy with some values changed, validated."""
        return dataclasses.replace(self, **_coerce(changes)).validate()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["token_set_lengths"] = list(self.token_set_lengths)
        return d


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's HH harmlessness setting: the dataclass defaults (official HH/main.py).
    "paper-hh": {},
    # official adv/main.py: minT = 5, temperature 2.0, up to 2 * topk - 1 sampling attempts.
    "paper-advbench": {"t_min": 5, "temperature": 2.0, "sample_attempts": 19},
    # official truth/main.py: minT = 16, self-evaluation of truthfulness.
    "paper-truthfulqa": {"t_min": 16, "template": "truthfulness"},
    # Ours: a small budget for trying things out and for tests on a CPU.
    "fast": {"num_candidates": 4, "sample_attempts": 3, "t_min": 2, "t_max": 8,
             "fresh_iterations": 3, "token_set_lengths": (1, 2, 4, 8), "max_new_tokens": 48},
}



def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Check keys and types of user-supplied values (TOML, flags, API kwargs)."""
    types = {f.name: f.type for f in fields(RainConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types:
            raise RainError(f"unknown config key {key!r}")
        default = getattr(RainConfig, key, None) if key != "token_set_lengths" else (1,)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, int):
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise TypeError
                value = float(value)
            elif isinstance(default, tuple):
                if isinstance(value, str):
                    value = [v for v in value.replace(",", " ").split()]
                value = tuple(int(v) for v in value)
            elif isinstance(default, str) and not isinstance(value, str):
                raise TypeError
        except (TypeError, ValueError):
            raise RainError(f"invalid config value {key}={value!r}: wrong type") from None
        out[key] = value
    return out


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                **overrides: Any) -> RainConfig:
    """Defaults, then a preset, then a TOML file, then explicit overrides; validated."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise RainError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        values.update(PRESETS[preset])
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise RainError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise RainError(f"config file {path} is not valid TOML: {err}") from None
        if "preset" in data:
            file_preset = data.pop("preset")
            if file_preset not in PRESETS:
                raise RainError(f"unknown preset {file_preset!r} in {path}")
            values = {**PRESETS[file_preset], **values}
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RainConfig(**_coerce(values)).validate()


def token_set_length(config: RainConfig, depth: int) -> int:
    """Length of the token sets below a node at `depth` (root = 0): 1, 2, 4, then 10."""
    lengths = config.token_set_lengths
    return lengths[min(depth, len(lengths) - 1)]


def check_speculate(speculate: int, *, remote: bool) -> None:
    """One clear line for a speculation setting that cannot run."""
    if speculate < 0:
        raise RainError(f"invalid speculate {speculate}: the most draft tokens per forward, 0 (off) or more")
    if speculate and remote:
        raise RainError("speculation (--speculate) runs on the transformers engine only: a vLLM server verifies no "
                        "drafts of ours, and vLLM's own speculative decoding fails the self-evaluation's logprob "
                        "requests (README, 'Fewer sequential forwards')")


__all__ = ["RainConfig", "PRESETS", "load_config", "token_set_length", "check_speculate"]
