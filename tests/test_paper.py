"""benchmarks/paper.sh, the paper's experiments as one GPU recipe, run small so it cannot rot.

The dry run is the README's: the default model on a CPU vLLM server (tests/test_vllm.py's launch), the
policy itself as the LM judge through that server's OpenAI endpoint, one prompt per task in each of
two shards, a budget a CPU affords (flags after `--` win over the paper presets). Without .venv-vllm
the dry run is skipped, unless RAIN_REQUIRE_VLLM=1 (CI), when it fails. The bad-input checks need no
server.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rain_llm.evaluation.data import default_data_dir
from rain_llm.evaluation.records import read_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper.sh"
RAIN = ROOT / ".venv" / "bin" / "rain"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# a CPU budget: 6 tokens, 2 iterations per step; the presets still set temperature, template, ...
SMALL = ["--max-new-tokens", "6", "--t-max", "2", "--t-min", "1", "--fresh-iterations", "1",
         "--token-set-lengths", "1,2", "--max-rollout-tokens", "8"]
STEMS = {"hh": "hh", "advbench-smoothllm": "advbench", "truthfulqa": "truthfulqa", "xstest": "xstest"}


def paper(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    ([], "no --engine-url"),
    (["--engine-url", "http://127.0.0.1:9"], "--judge-url and --judge-name are required"),
    (["--engine-url", "u", "--judge-url", "j", "--judge-name", "n", "--limit", "0"], "invalid --limit 0"),
    (["--engine-url", "u", "--judge-url", "j", "--judge-name", "n", "--shard", "1"], "invalid --shard 1"),
    (["--engine-url", "u", "--judge-url", "j", "--judge-name", "n", "--tasks", "hh,imdb"], "unknown task imdb"),
    (["--engine-url"], "--engine-url needs a value"),
    (["--frobnicate"], "unknown argument --frobnicate"),
])
def test_bad_arguments_get_one_line(tmp_path, args, message):
    out = paper("--out", str(tmp_path / "out"), *args, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("paper.sh: error: ")
    assert message in out.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.fixture(scope="module")
def vllm_server(default_model_dir, tmp_path_factory):
    from test_vllm import VLLM_PYTHON, VLLMServer  # skips (or, with RAIN_REQUIRE_VLLM=1, fails) without vLLM

    if not VLLM_PYTHON.exists():
        pytest.fail(f"RAIN_REQUIRE_VLLM=1 but there is no vLLM environment at {VLLM_PYTHON}")
    srv = VLLMServer(default_model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")
def test_dry_run_shards_resumes_and_reports(vllm_server, tmp_path):
    out = tmp_path / "paper"
    args = ["--engine-url", vllm_server.url, "--judge-url", vllm_server.url + "/v1", "--judge-name", "smol",
            "--variants", "smoothllm", "--limit", "1", "--batch", "2", "--out", str(out), "--rain", str(RAIN)]
    runs = [paper(*args, "--shard", f"{i}/2", "--", *SMALL) for i in (0, 1)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    ids: dict[str, set[str]] = {}
    for stem, task in STEMS.items():
        for i in (0, 1):
            records = read_records(out / f"{stem}.shard-{i}-of-2.jsonl")
            assert sorted(r.method for r in records) == ["rain", "vanilla"]
            assert len({r.id for r in records}) == 1
            ids.setdefault(stem, set()).update(r.id for r in records)
            for r in records:
                assert r.task == task and r.response.strip()
                assert r.compute["total"]["tokens"] > 0
                # every record says how it was judged: the endpoint and model given
                lm = [j for j in r.judges.values() if isinstance(j, dict) and "backend" in j]
                assert lm and all(j["backend"]["type"] == "openai" and j["backend"]["model"] == "smol"
                                  and j["backend"]["base_url"] == vllm_server.url + "/v1" for j in lm)
            rain = next(r for r in records if r.method == "rain")
            config = rain.method_config["config"]
            assert config["t_max"] == 2 and config["max_new_tokens"] == 6  # flags after -- win over the preset
            assert config["template"] == ("truthfulness" if task == "truthfulqa" else "harmlessness")
            assert config["temperature"] == (2.0 if task == "advbench" else 1.0)  # paper-advbench's temperature
            assert rain.answer_tokens <= 6
        assert len(ids[stem]) == 2  # the two shards are disjoint
    hh_rain = next(r for r in read_records(out / "hh.shard-0-of-2.jsonl") if r.method == "rain")
    assert {"harmless", "helpful", "win_harmless_vs_vanilla", "win_helpful_vs_vanilla"} <= set(hh_rain.scores)
    assert "jailbroken" in read_records(out / "advbench-smoothllm.shard-0-of-2.jsonl")[0].scores
    assert {"truthful", "informative"} <= set(read_records(out / "truthfulqa.shard-1-of-2.jsonl")[0].scores)

    report = (out / "report" / "report.md").read_text()
    for section in ("## hh", "## advbench/smoothllm", "## truthfulqa", "## xstest"):
        assert section in report
    assert report.count("| vanilla | 2 |") == 4 and report.count("| rain | 2 |") == 4  # both shards in every table
    assert "Paired with vanilla: rain:" in report

    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    again = paper(*args, "--shard", "0/2", "--", *SMALL)  # a rerun resumes: nothing is answered twice
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("0 answers written") == len(STEMS)
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
