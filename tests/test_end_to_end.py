"""End to end on the bundled default model (SmolLM2-135M-Instruct), offline, with small budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rain_llm import Rain, load_config

pytestmark = pytest.mark.slow  # the bundled model end to end (or subprocesses): left out by -m 'not slow'

PROMPT = "How do I pick a lock?"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def rain_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rain_llm.shells.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def small(**kw):
    return load_config("fast", max_new_tokens=kw.pop("max_new_tokens", 10), t_max=kw.pop("t_max", 4), **kw)


def test_cli_rain_json_reports_text_tokens_and_compute():
    proc = rain_cli("generate", "--preset", "fast", "--max-new-tokens", "8", "--t-max", "3", "--json", PROMPT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "rain" and out["text"]
    assert 0 < len(out["token_ids"]) <= 8
    stats = out["stats"]
    assert stats["committed_steps"] == len(stats["iterations_per_step"]) >= 1
    assert sum(stats["iterations_per_step"]) == stats["iterations"] == stats["rewinds"]
    compute = stats["compute"]
    for phase in ("expand", "simulate", "evaluate", "embed"):
        assert compute[phase]["forward_passes"] > 0 and compute[phase]["tokens"] > 0
    phases = [c for k, c in compute.items() if k not in ("total", "least_work")]
    assert compute["total"]["tokens"] == sum(c["tokens"] for c in phases)
    assert 0 < compute["least_work"]["tokens"] <= compute["total"]["tokens"]
    assert "step 1" in proc.stderr and "forward passes/tokens" in proc.stderr  # progress + summary


def test_cli_speculate_gives_the_same_answer_in_fewer_forwards():
    """`--speculate` through the command line, on the default model: the same answer and search,
    drafts fed and accepted (greedy rollouts), fewer sequential LM forwards."""
    args = ("generate", "--preset", "fast", "--max-new-tokens", "8", "--t-max", "4", "--rollout-temperature", "0",
            "--json", PROMPT)
    plain, spec = rain_cli(*args), rain_cli(args[0], "--speculate", "8", *args[1:])
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    a, b = json.loads(plain.stdout), json.loads(spec.stdout)
    assert b["token_ids"] == a["token_ids"] and b["stats"]["iterations_per_step"] == a["stats"]["iterations_per_step"]
    total = b["stats"]["compute"]["total"]
    assert total["accepted_draft_tokens"] > 0 and "draft_tokens" not in a["stats"]["compute"]["total"]
    assert total["lm_forward_passes"] < a["stats"]["compute"]["total"]["lm_forward_passes"]


def test_cli_vanilla_prints_greedy_answer(default_rain):
    proc = rain_cli("generate", "--method", "vanilla", "--max-new-tokens", "12", PROMPT)
    assert proc.returncode == 0, proc.stderr
    expected = default_rain.generate(PROMPT, method="vanilla", max_new_tokens=12).text
    assert proc.stdout.strip() == expected
    assert "vanilla: 12 tokens" in proc.stderr


def test_cli_trace_writes_whole_search(tmp_path):
    trace = tmp_path / "run.json"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('preset = "fast"\nmax_new_tokens = 6\nt_max = 3\nseed = 3\n')
    proc = rain_cli("generate", "--config", str(cfg), "--json", "--trace", str(trace), PROMPT)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(trace.read_text())
    out = json.loads(proc.stdout)
    assert data["token_ids"] == out["token_ids"] and data["config"]["seed"] == 3
    assert len(data["steps"]) == out["stats"]["committed_steps"]
    committed = [t for step in data["steps"] for t in step["committed"]]
    assert committed == out["token_ids"]
    root = data["steps"][0]["tree"]
    node = root["children"][0]
    for key in ("tokens", "text", "visits", "value", "prior", "similarity_updates", "dynamic", "children"):
        assert key in node
    assert root["visits"] == sum(c["visits"] for c in root["children"]) + 1  # one root evaluation


def test_api_same_seed_same_answer(default_rain):
    a = default_rain.generate(PROMPT, small(seed=5))
    b = default_rain.generate(PROMPT, small(seed=5))
    assert a.token_ids == b.token_ids and a.stats.iterations_per_step == b.stats.iterations_per_step


def test_api_reuse_off_does_more_work_for_the_same_answer(default_rain):
    on = default_rain.generate(PROMPT, small(seed=1))
    off = default_rain.generate(PROMPT, small(seed=1, reuse_cache=False))
    assert on.token_ids == off.token_ids
    assert off.stats.compute.total().tokens > 3 * on.stats.compute.total().tokens


def test_api_vanilla_and_rain_share_settings(default_rain):
    v = default_rain.generate(PROMPT, small(method="vanilla", max_new_tokens=5))
    assert v.method == "vanilla" and len(v.token_ids) <= 5 and v.stats.compute.phases["generate"].forward_passes <= 5


def test_api_answer_ends_at_end_of_turn(default_rain):
    out = default_rain.generate("Say hi.", method="vanilla", max_new_tokens=200)
    assert len(out.token_ids) < 200
    assert out.token_ids[-1] in default_rain.codec.stop_ids


def test_transcript_format_for_base_prompting(default_rain):
    out = default_rain.generate(PROMPT, small(prompt_format="raw", fewshot="default", max_new_tokens=8))
    assert "Human:" not in out.text
    assert out.stats.committed_steps >= 1


def test_value_modes_and_templates_reach_the_evaluation(default_rain, monkeypatch):
    """Each setting changes what the self-evaluation is asked and how its answer is read: the
    template's text is in the scored prompt, the raw format has no chat markers, the vote is one
    of -1, 0, 1 and the mean mode is continuous."""
    from rain_llm.values.templates import SelfEvaluator

    seen: list[tuple[str, float]] = []
    request, value_from = SelfEvaluator.request, SelfEvaluator.value_from

    def record_request(self, response, owner=None):
        out = request(self, response, owner)
        seen.append((default_rain.tokenizer.decode(out.prefix), None))
        return out

    def record_value(self, p):
        value = value_from(self, p)
        seen.append((None, value))
        return value

    monkeypatch.setattr(SelfEvaluator, "request", record_request)
    monkeypatch.setattr(SelfEvaluator, "value_from", record_value)
    runs = {}
    for name, kw in {"vote": {}, "mean": {"value_mode": "mean"}, "truthfulness": {"template": "truthfulness"},
                     "raw": {"eval_format": "raw"}}.items():
        seen.clear()
        out = default_rain.generate(PROMPT, small(max_new_tokens=4, t_max=2, **kw))
        assert out.token_ids
        runs[name] = ([p for p, _ in seen if p is not None], [v for _, v in seen if v is not None])
    assert all(v in (-1.0, 0.0, 1.0) for v in runs["vote"][1])
    assert any(v not in (-1.0, 0.0, 1.0) for v in runs["mean"][1])
    assert all("truthful" in p for p in runs["truthfulness"][0])
    assert not any("truthful" in p for p in runs["vote"][0])
    assert all("<|im_start|>" in p for p in runs["vote"][0])  # the default model's chat template
    assert not any("<|im_start|>" in p for p in runs["raw"][0])


def test_template_prefix_is_encoded_once_across_prompts(default_rain):
    cfg = small(max_new_tokens=2, t_max=2)
    fresh = Rain(default_rain.model, default_rain.tokenizer, embedder=default_rain.embedder,
                 name="default")  # an empty cache
    first = fresh.generate("What is the capital of France?", cfg)
    second = fresh.generate("How do I bake bread?", cfg)
    # the first answer encodes the whole evaluation template; later ones only their prompt's part
    assert second.stats.compute.phases["prefill"].tokens < first.stats.compute.phases["prefill"].tokens / 3
    constant = len(fresh.answer(0, "Hi", cfg).setup.constant)  # the template's constant part, in tokens
    assert first.stats.compute.least_work - second.stats.compute.least_work > constant / 2


def test_model_from_local_folder_and_gguf_file(default_rain, default_model_dir):
    from rain_llm.engine.hf.models import default_gguf, resolve

    assert resolve(str(default_model_dir))[0] == str(default_model_dir)
    assert resolve(str(default_gguf()))[0] == str(default_model_dir)  # converted once, then reused
    folder = Rain.load(str(default_model_dir))
    expected = default_rain.generate(PROMPT, method="vanilla", max_new_tokens=6).token_ids
    assert folder.generate(PROMPT, method="vanilla", max_new_tokens=6).token_ids == expected


def test_device_map_auto_loads_and_generates(default_model_dir):
    spread = Rain.load(str(default_model_dir), device_map="auto")  # one CPU here: everything lands on it
    out = spread.generate(PROMPT, method="vanilla", max_new_tokens=4)
    assert len(out.token_ids) == 4


def test_compute_budget_stops_search_and_finishes_answer(default_rain):
    default_rain.generate(PROMPT, small(max_new_tokens=2))  # the evaluation template is cached either way
    out = default_rain.generate(PROMPT, small(max_new_tokens=12, t_max=8, max_search_tokens=150))
    stats = out.stats.to_dict()
    assert stats["budget_stopped"]
    assert stats["compute"]["total"]["tokens"] < 150 + 1000  # one iteration may run past the line
    assert len(out.token_ids) == 12 or out.token_ids[-1] in default_rain.codec.stop_ids
    least = stats["compute"]["least_work"]["tokens"]
    assert 0 < least <= stats["compute"]["total"]["tokens"]
