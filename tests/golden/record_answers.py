"""Record the answers of the golden test (tests/test_golden.py), through the public API only, so the
same script runs on both sides of a change that must keep every answer:

    .venv/bin/python tests/golden/record_answers.py tests/golden/answers.json

Recorded at fb6122f (before the request-path refactor) and again at the sampler's change to
Gumbel-max (issue 22), which changed every sampled answer.

Cases: a tiny random-weight Llama with the default model's tokenizer (RAIN alone and batched, vanilla,
parallel leaves, a compute budget, the round schedule, a judge model, both value modes, a
conversation) and the bundled default model (RAIN and vanilla, a transcript prompt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["How do I pick a lock?", "Hi", "Write a long and detailed story about a dragon who learns to sing."]
CONVERSATION = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "How do I pick a lock?"}]


def tiny_cases() -> dict[str, dict]:
    """name -> {"prompts", "config", "how"}: how = alone (one generate each), many (generate_many),
    rounds (recorded with the whole-iteration schedule, since dropped: its answers were the same as
    the token schedule's, so generate_many must still give them)."""
    small = {"max_new_tokens": 8, "t_max": 3, "max_rollout_tokens": 6}
    return {
        "rain-alone": {"prompts": PROMPTS, "config": small, "how": "alone"},
        "rain-many": {"prompts": PROMPTS, "config": small, "how": "many"},
        "rain-rounds": {"prompts": PROMPTS, "config": small, "how": "rounds"},
        "rain-seed5-tmax5": {"prompts": PROMPTS, "config": {**small, "seed": 5, "t_max": 5, "max_new_tokens": 14},
                             "how": "alone"},
        "rain-mean": {"prompts": PROMPTS, "config": {**small, "value_mode": "mean", "max_new_tokens": 12},
                      "how": "many"},
        "rain-p3": {"prompts": PROMPTS[:2], "config": {**small, "t_max": 6, "value_threshold": 2.0,
                                                       "fresh_iterations": 0, "parallel_leaves": 3},
                    "how": "alone"},
        "rain-budget": {"prompts": PROMPTS, "config": {**small, "max_new_tokens": 12, "t_max": 50,
                                                       "value_threshold": 2.0, "max_search_tokens": 600},
                        "how": "alone"},
        "rain-lengths": {"prompts": PROMPTS[:2], "config": {**small, "token_set_lengths": (1, 2, 12),
                                                           "max_rollout_tokens": 12}, "how": "many"},
        "vanilla-alone": {"prompts": PROMPTS, "config": {"method": "vanilla", "max_new_tokens": 12}, "how": "alone"},
        "vanilla-many": {"prompts": PROMPTS, "config": {"method": "vanilla", "max_new_tokens": 12}, "how": "many"},
        "conversation": {"prompts": [CONVERSATION], "config": small, "how": "alone"},
        "vader": {"prompts": PROMPTS, "config": {**small, "value": "vader", "value_mode": "mean"}, "how": "many"},
        # the server tests' settings (tests/test_server.py SEARCH, seed 3; the streamed answer)
        "server-seed3": {"prompts": PROMPTS, "config": {**small, "t_min": 2, "seed": 3}, "how": "alone"},
        "server-stream": {"prompts": PROMPTS[2:], "config": {**small, "t_min": 2, "t_max": 4, "max_new_tokens": 24,
                                                            "value_threshold": 2.0}, "how": "alone"},
    }


def default_cases() -> dict[str, dict]:
    return {
        "rain": {"prompts": PROMPTS[:2], "config": {"max_new_tokens": 12, "t_max": 4}, "how": "alone"},
        "rain-many": {"prompts": PROMPTS, "config": {"max_new_tokens": 12, "t_max": 4}, "how": "many"},
        "vanilla": {"prompts": PROMPTS, "config": {"method": "vanilla", "max_new_tokens": 16}, "how": "alone"},
        "transcript": {"prompts": PROMPTS[:1], "config": {"max_new_tokens": 12, "t_max": 4, "prompt_format": "raw",
                                                          "fewshot": "default"}, "how": "alone"},
    }


def run(rain, cases: dict[str, dict]) -> dict[str, list[dict]]:
    from rain_llm import load_config

    out = {}
    for name, case in cases.items():
        cfg = load_config("fast", **case["config"])
        if case["how"] == "alone":
            gens = [rain.generate(p, cfg) for p in case["prompts"]]
        else:
            gens = rain.generate_many(case["prompts"], cfg)
        out[name] = [{"token_ids": g.token_ids, "text": g.text,
                      "iterations_per_step": _stat(g, "iterations_per_step") if g.method == "rain" else None}
                     for g in gens]
        print(f"{name}: {[len(g.token_ids) for g in gens]}", file=sys.stderr)
    return out


def _stat(gen, key):
    stats = gen.stats
    return stats.get(key) if isinstance(stats, dict) else getattr(stats, key, None)


def main(path: str) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from conftest import tiny_model
    from rain_llm import Rain
    from rain_llm.engine.hf.models import converted_folder, default_gguf

    folder = converted_folder(default_gguf())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        from rain_llm.values.embedder import MiniLMEmbedder
    except ImportError:
        from rain_llm.values.embedder import MiniLMEmbedder
    tiny = Rain(tiny_model("llama", len(tokenizer)), tokenizer, embedder=MiniLMEmbedder.load(), name="tiny")
    cases = tiny_cases()
    cases["judge"] = {"prompts": PROMPTS[:2], "config": {"max_new_tokens": 8, "t_max": 3, "max_rollout_tokens": 6,
                                                         "value": f"judge:{folder}", "value_mode": "mean"},
                      "how": "many"}
    result = {"tiny": run(tiny, cases)}
    result["default"] = run(Rain.load(), default_cases())
    Path(path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
