"""`rain bench` runs every method side by side and writes what it promises."""

from __future__ import annotations

import json

from rain_llm.shells.cli import main


def test_bench_tiny_random_model(tmp_path, capsys, default_model_dir):
    out = tmp_path / "bench.json"
    code = main(["bench", "--random", "tiny", "--prompts", "2", "--methods",
                 "vanilla,rain,rain-no-reuse,rain-p2,rain-b2,vanilla-b2,rain-s4,rain-s4-b2",
                 "--preset", "fast", "--max-new-tokens", "6", "--t-max", "4", "--fixed-budget",
                 "--max-rollout-tokens", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "x vanilla" in printed and "rain-p2" in printed
    data = json.loads(out.read_text())
    s = data["summary"]
    assert set(s) == {"vanilla", "rain", "rain-no-reuse", "rain-p2", "rain-b2", "vanilla-b2", "rain-s4", "rain-s4-b2"}
    for speculating in ("rain-s4", "rain-s4-b2"):  # compared with the same method without speculation
        assert s[speculating]["answers_equal_unspeculated"] is True
    assert "answers_equal_unspeculated" not in s["rain"]
    assert s["rain-s4-b2"]["throughput_x_unbatched"] > 0  # against rain-s4, one prompt at a time
    batched = "rain-b2"  # compared with rain one prompt at a time
    assert s[batched]["batch"] == 2 and s[batched]["throughput_x_unbatched"] > 0
    assert s[batched]["answer_tokens"] == s["rain"]["answer_tokens"]  # same prompts, same budget
    assert s[batched]["forward_passes_per_token"] < s["rain"]["forward_passes_per_token"]
    runs = data["runs"]
    assert runs["rain-b2"][0]["texts"] == [r["texts"][0] for r in runs["rain"]]
    assert runs["vanilla-b2"][0]["texts"] == [r["texts"][0] for r in runs["vanilla"]]
    assert s["rain"]["throughput_x_unbatched"] is None
    assert all(-1.0 <= m["final_value"] <= 1.0 for m in s.values())  # the answers' self-evaluation
    assert s["vanilla"]["x_vanilla"] == 1.0
    assert s["rain-no-reuse"]["tokens_per_token"] > s["rain"]["tokens_per_token"]
    assert s["rain"]["lm_tokens_over_least_work"] >= 1.0  # never less than the least work
    assert s["rain-no-reuse"]["lm_tokens_over_least_work"] > s["rain"]["lm_tokens_over_least_work"]
    for phase in ("expand", "evaluate"):
        assert s["rain"]["phases"][phase]["forward_passes"] > 0
    for rec in runs["rain"]:  # the language model's forwards: all but the embedder's, each once
        phases = rec["compute"]
        lm = rec["lm_forward_passes"]
        assert max(c["forward_passes"] for p, c in phases.items() if p not in ("total", "least_work", "embed")) <= lm
        assert lm < rec["forward_passes"] and rec["iterations"] > 0
    assert s["rain"]["lm_forward_passes_per_iteration"] > 1  # a decode step and an evaluation at least
    assert s["vanilla"]["lm_forward_passes_per_iteration"] is None  # no search
    assert "LM forward passes per search iteration" in printed
    assert data["machine"]["torch"] and data["config"]["value_threshold"] == 2.0


def test_bench_methods_parse_into_what_they_mean():
    from rain_llm.shells.bench import BenchMethod

    m = BenchMethod.parse("rain-p4-s8-b2")
    assert (m.base, m.overrides, m.speculate, m.batch, m.remote) == ("rain-p4", {"parallel_leaves": 4}, 8, 2, False)
    remote = BenchMethod.parse("vllm:rain-b3")
    assert (remote.base, remote.batch, remote.remote, remote.speculate) == ("rain", 3, True, None)
    assert BenchMethod.parse("vanilla").overrides == {"method": "vanilla"}
    assert BenchMethod.parse("rain-p4-b2").is_plain_of(m) and not BenchMethod.parse("rain-b2").is_plain_of(m)
    assert BenchMethod.parse("rain-p4-s8").is_unbatched_of(m) and not BenchMethod.parse("rain-p4").is_unbatched_of(m)


def test_bench_bad_method(capsys):
    assert main(["bench", "--methods", "vanilla,magic"]) == 2
    assert "unknown bench method" in capsys.readouterr().err


def _drafter_potential():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "drafter_potential.py"
    spec = importlib.util.spec_from_file_location("drafter_potential", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_verify_rounds_counts_forwards_of_exact_speculation():
    verify_rounds = _drafter_potential()[0].verify_rounds
    assert verify_rounds([False] * 5, 4) == (5, 20)  # nothing accepted: one token per forward
    assert verify_rounds([True] * 8, 4) == (2, 8)  # 4 accepted + the target's next token, twice
    assert verify_rounds([True, True, False, True, True], 4) == (2, 8)  # 2 + its own, then the rest
    assert verify_rounds([True] * 3, 8) == (1, 8)


def test_a_model_drafting_for_itself_is_accepted_everywhere(tmp_path, default_model_dir):
    """The premise of exact speculation, on real searches: fed a decoded row in one forward, the model
    picks every token the row drew, from the same uniforms (so its own drafts are always accepted and
    a verifier's one forward reproduces what step-by-step decoding drew)."""
    import subprocess
    import sys

    out = tmp_path / "drafter.json"
    path = _drafter_potential()[1]
    proc = subprocess.run([sys.executable, str(path), "--target", str(default_model_dir), "--drafter",
                           str(default_model_dir), "--dtype", "float32", "--prompts", "1", "--max-new-tokens", "4",
                           "--t-max", "3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["expansions"] > 0 and data["rows"]
    for kind, s in data["rows"].items():
        assert s["tokens"] > 0, kind
        assert s["accepted"] == s["tokens"] and s["target_refeed_differs"] == 0, (kind, s)
    steps = data["sequential_steps_per_expansion_sum"]
    assert steps["k4"] < steps["plain"]
