"""The evaluation clients researchers use, for real, against a real `rain serve` on the default model:
EleutherAI's lm-evaluation-harness (`lm-eval run --model local-chat-completions`, and
`local-completions`) and UK AISI's Inspect (`inspect eval --model openai-api/...`).

Each client runs from its own environment (scripts/setup_eval_clients.sh makes .venv-lmeval and
.venv-inspect). Without one, its tests are skipped, unless RAIN_REQUIRE_EVAL_CLIENTS=1 (CI), when
they fail. A task of three questions (Inspect: two), 8 answer tokens and a small search budget keep
the run short: this checks that the clients and the server understand each other and that every
sample was answered by the method asked (from the clients' own output files: lm-eval's samples
against the server's answer log, Inspect's log of each model call), not how good the answers are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from server_helpers import WAIT, wait_until

pytestmark = pytest.mark.slow  # the real default model and real clients: left out by -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm-eval"
INSPECT = ROOT / ".venv-inspect" / "bin" / "inspect"
REQUIRED = os.environ.get("RAIN_REQUIRE_EVAL_CLIENTS") == "1"
QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the opposite of hot?", "cold"),
             ("What is 2 + 3?", "5")]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NO_COLOR": "1"}
TASK = """\
task: rain_tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
filter_list:
  - name: last-word
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
INSPECT_TASK = """\
from inspect_ai import Task, task
from inspect_ai.dataset import json_dataset
from inspect_ai.scorer import includes
from inspect_ai.solver import generate


@task
def tiny_qa():
    return Task(dataset=json_dataset({data!r}), solver=generate(), scorer=includes())
"""


def need(client: Path) -> None:
    if not client.exists():
        message = f"no {client.name} at {client} (run scripts/setup_eval_clients.sh)"
        if REQUIRED:
            pytest.fail(message + "; RAIN_REQUIRE_EVAL_CLIENTS=1 asks for it")
        pytest.skip(message + "; RAIN_REQUIRE_EVAL_CLIENTS=1 makes this a failure")


@dataclass
class Served:
    url: str
    answer_log: Path

    def answers(self) -> list[dict]:
        return [json.loads(line) for line in self.answer_log.read_text().splitlines()]


@pytest.fixture(scope="module")
def served(default_model_dir, tmp_path_factory):
    """`rain serve` on the default model with a small search budget, logging every answer."""
    where = tmp_path_factory.mktemp("serve")
    log = where / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rain_llm.shells.cli", "serve", "--port", "0", "--preset",
                                 "fast", "--t-max", "4", "--max-new-tokens", "8", "--answer-log",
                                 str(where / "answers.jsonl")], stderr=out, env=OFFLINE)
    try:
        wait_until(lambda: "serving 'default' at" in log.read_text() or proc.poll() is not None, "rain serve")
        assert proc.poll() is None, log.read_text()
        url = log.read_text().split("serving 'default' at ")[1].split()[0]
        yield Served(url, where / "answers.jsonl")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert "Traceback" not in log.read_text(), log.read_text()


def run(command: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env or OFFLINE, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def lm_eval(served: Served, tmp_path: Path, model: str, method: str) -> tuple[list[dict], list[dict], dict]:
    """One lm-eval run of the three-question task: its samples, the server's answers to it, its results."""
    data = tmp_path / "tiny_qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    (tmp_path / "tiny_qa.yaml").write_text(TASK.format(data=data))
    before = len(served.answers()) if served.answer_log.exists() else 0
    endpoint = {"local-chat-completions": "chat/completions", "local-completions": "completions"}[model]
    args = f"model=default,base_url={served.url}/{endpoint},num_concurrent=3"
    chat = ["--apply_chat_template"] if model == "local-chat-completions" else []
    run([LM_EVAL, "run", "--model", model, "--model_args", args + ("" if chat else ",tokenizer_backend=none"), *chat,
         "--include_path", tmp_path, "--tasks", "rain_tiny_qa", "--output_path", tmp_path / "out", "--log_samples",
         "--gen_kwargs", json.dumps({"rain": {"method": method}})], tmp_path)
    (samples_file,) = (tmp_path / "out").rglob("samples_rain_tiny_qa_*.jsonl")
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return samples, served.answers()[before:], json.loads(results_file.read_text())["results"]["rain_tiny_qa"]


@pytest.mark.parametrize("method", ["vanilla", "rain"])
def test_lm_eval_local_chat_completions(served, tmp_path, method):
    """lm-eval sends its stop strings, temperature 0 and a seed, and the RAIN settings of
    --gen_kwargs; every sample is answered once, by the method asked, with the text lm-eval scored."""
    need(LM_EVAL)
    samples, answers, results = lm_eval(served, tmp_path, "local-chat-completions", method)
    assert len(samples) == len(QUESTIONS) == len(answers)
    by_prompt = {a["prompt"]: a for a in answers}
    for sample in samples:
        asked = sample["arguments"]["gen_args_0"]
        (rendered,) = asked["arg_0"]  # the chat messages lm-eval sent, as JSON
        (message,) = json.loads(rendered)
        answer = by_prompt[message["content"]]
        assert asked["arg_1"]["rain"] == {"method": method} and answer["method"] == method
        assert answer["object"] == "chat" and sample["resps"] == [[answer["text"]]]
        assert answer["finish_reason"] in ("stop", "length") and "\n" not in answer["text"]
    assert 0 <= results["exact_match,last-word"] <= 1


def test_lm_eval_local_completions(served, tmp_path):
    """lm-eval's local-completions (plain prompts, /v1/completions) with tokenizer_backend=none."""
    need(LM_EVAL)
    samples, answers, _ = lm_eval(served, tmp_path, "local-completions", "vanilla")
    assert len(samples) == len(answers) == len(QUESTIONS)
    by_prompt = {a["prompt"]: a for a in answers}
    for sample in samples:
        answer = by_prompt[sample["arguments"]["gen_args_0"]["arg_0"]]
        assert answer["method"] == "vanilla" and answer["object"] == "completion"
        assert sample["resps"] == [[answer["text"]]]


@pytest.mark.parametrize("method", ["vanilla", "rain"])
def test_inspect_openai_api(served, tmp_path, method):
    """Inspect's openai-api provider with a base URL and --extra-body: both samples answered, each
    model call's response (in Inspect's own log) by the method asked, and scored."""
    need(INSPECT)
    data = tmp_path / "tiny_qa.jsonl"
    data.write_text("".join(json.dumps({"input": q, "target": a}) + "\n" for q, a in QUESTIONS[:2]))
    (tmp_path / "tiny_qa.py").write_text(INSPECT_TASK.format(data=str(data)))
    env = {**OFFLINE, "RAIN_BASE_URL": served.url, "RAIN_API_KEY": "none"}
    run([INSPECT, "eval", "tiny_qa.py", "--model", "openai-api/rain/default", "--log-dir", tmp_path / "logs",
         "--max-tokens", "8", "--temperature", "0", "--display", "plain",
         "--extra-body", json.dumps({"rain": {"method": method}})], tmp_path, env)
    (log,) = (tmp_path / "logs").glob("*.eval")
    dump = json.loads(run([INSPECT, "log", "dump", log], tmp_path, env).stdout)
    assert dump["status"] == "success" and len(dump["samples"]) == 2
    for sample in dump["samples"]:
        (call,) = [event["call"] for event in sample["events"] if event["event"] == "model"]
        assert call["request"]["extra_body"] == {"rain": {"method": method}}
        assert call["response"]["rain"]["method"] == method and call["response"]["object"] == "chat.completion"
        assert sample["output"]["completion"] == call["response"]["choices"][0]["message"]["content"]
        assert set(sample["scores"]) == {"includes"}
    assert dump["results"]["scores"][0]["metrics"]["accuracy"]["value"] in (0, 0.5, 1)
