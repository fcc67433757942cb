"""`rain bench` runs every method side by side and writes what it promises."""

from __future__ import annotations

import json

from rain_llm.shells.cli import main


def test_bench_tiny_random_model(tmp_path, capsys, default_model_dir):
    out = tmp_path / "bench.json"
    code = main(["bench", "--random", "tiny", "--prompts", "2", "--methods",
                 "vanilla,rain,rain-no-reuse,rain-p2,rain-b2,vanilla-b2",
                 "--preset", "fast", "--max-new-tokens", "6", "--t-max", "4", "--fixed-budget",
                 "--max-rollout-tokens", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "x vanilla" in printed and "rain-p2" in printed
    data = json.loads(out.read_text())
    s = data["summary"]
    assert set(s) == {"vanilla", "rain", "rain-no-reuse", "rain-p2", "rain-b2", "vanilla-b2"}
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
    assert data["machine"]["torch"] and data["config"]["value_threshold"] == 2.0


def test_bench_bad_method(capsys):
    assert main(["bench", "--methods", "vanilla,magic"]) == 2
    assert "unknown bench method" in capsys.readouterr().err
