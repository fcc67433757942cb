"""Answers equal those recorded for the same seeds and settings: RAIN alone and batched, both
schedules, vanilla, parallel leaves, a compute budget, value modes, a judge model, a conversation, on a
tiny random Llama and on the default model; and the same answers with speculation on.
`tests/golden/record_answers.py` made the file (through the public API only) and runs the same cases
here. Recorded first at fb6122f (before the request-path refactor, which kept every answer), again when
the sampler changed from an inverse CDF to Gumbel-max (every sampled answer changed; issue 22)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "answers.json"
sys.path.insert(0, str(GOLDEN.parent))

from record_answers import PROMPTS, run, tiny_cases  # noqa: E402


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def check(recorded: dict, now: dict) -> None:
    for name, answers in recorded.items():
        for i, (want, got) in enumerate(zip(answers, now[name], strict=True)):
            assert got["token_ids"] == want["token_ids"], f"{name}[{i}]"
            assert got["text"] == want["text"], f"{name}[{i}]"
            assert got["iterations_per_step"] == want["iterations_per_step"], f"{name}[{i}]"


@pytest.mark.parametrize("speculate", [0, 8])
def test_tiny_model_answers_equal_the_recorded_ones(golden, tiny_llama, tokenizer, embedder, default_model_dir,
                                                    speculate):
    from rain_llm import Rain

    tiny = Rain(tiny_llama, tokenizer, embedder=embedder, name="tiny", speculate=speculate)
    cases = tiny_cases()
    cases["judge"] = {"prompts": PROMPTS[:2], "config": {"max_new_tokens": 8, "t_max": 3, "max_rollout_tokens": 6,
                                                         "value": f"judge:{default_model_dir}", "value_mode": "mean"},
                      "how": "many"}
    assert set(cases) == set(golden["tiny"])
    check(golden["tiny"], run(tiny, cases))


@pytest.mark.slow
@pytest.mark.parametrize("speculate", [0, 8])
def test_default_model_answers_equal_the_recorded_ones(golden, default_rain, speculate):
    from record_answers import default_cases

    rain = default_rain.speculating(speculate) if speculate else default_rain
    check(golden["default"], run(rain, default_cases()))
