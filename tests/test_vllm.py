"""The vLLM backend (`rain_llm.engine.vllm`) against a real vLLM server on the CPU.

A module-scoped fixture starts vLLM from .venv-vllm (scripts/setup_vllm.sh) on the default model's
folder, on a free loopback port, and stops it at the end. Without .venv-vllm the module is skipped,
unless RAIN_REQUIRE_VLLM=1 (CI), when it fails.

Tolerances: both engines run float32 on the CPU, but vLLM's kernels reduce in another order and
their results depend on the batch's shape (the same request alone or beside others differs by
~1e-5 in log-probability, measured). Probabilities are compared to 1e-4 absolute, log-probabilities
of single tokens to 2e-4, sums over a row's tokens to 1e-3 (measured: under 5e-5 for 6 tokens).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from rain_llm import Rain, load_config
from rain_llm.errors import RainError
from rain_llm.runtime.backend import Row, SampleRows, Score, TextStop, TopTokens
from rain_llm.runtime.rain_env import candidates_from
from rain_llm.runtime.scheduler import run_requests

pytestmark = pytest.mark.slow  # a real vLLM server: left out by -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
REQUIRED = os.environ.get("RAIN_REQUIRE_VLLM") == "1"
NAME = "smol"
PROMPTS = ["How do I pick a lock?", "Write a short poem about the sea.", "What is the capital of France?"]
STOP_CHARS = ",.?:;\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

if not VLLM_PYTHON.exists() and not REQUIRED:
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (run scripts/setup_vllm.sh; RAIN_REQUIRE_VLLM=1 makes "
                "this a failure)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One vLLM server in its own process group (the exact launch of the README's 'Scaling out')."""

    def __init__(self, folder: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                 "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
                 "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", "1G",
                 "--block-size", "32", "--max-logprobs", "20", "--enable-prompt-tokens-details",
                 "--generation-config", "vllm"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"vLLM server exited ({self.proc.returncode}): {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"vLLM server not healthy after {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def kill(self) -> None:
        """Die at once, as a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """Terminate the server's process group, then kill it if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # its workers, should any outlive the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"RAIN_REQUIRE_VLLM=1 but there is no vLLM environment at {VLLM_PYTHON}: run scripts/setup_vllm.sh")
    srv = VLLMServer(default_model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hf(default_rain):
    return default_rain


@pytest.fixture(scope="module")
def vrain(server):

    return Rain.connect(server.url)


def chat_ids(rain: Rain, text: str) -> list[int]:
    _, ids = rain.prepare(text, load_config("fast"))
    return ids


def teacher_forced(model, context: list[int], tokens: list[int], temperature: float, top_k: int) -> float:
    """The HF engine's log-probability of `tokens` after `context` under a row's warped distribution
    (logits / T, then the top k renormalised: `engine.hf.stream.sample`)."""
    with torch.no_grad():
        logits = model(torch.tensor([context + tokens])).logits[0, len(context) - 1:-1].double()
    total = 0.0
    for token, row in zip(tokens, logits / temperature):
        values, ids = torch.topk(row, top_k)
        total += float(torch.log_softmax(values, -1)[(ids == token).nonzero()[0, 0]])
    return total


# ---------------------------------------------------------------------------------------------- same numbers
def test_option_probabilities_equal_the_transformers_backend(hf, vrain):
    cfg = load_config("fast")
    evaluator = hf.value_source(cfg).bind(PROMPTS[0])
    texts = ["Choosing a lock is", "I can't help with that.", "Use a tension wrench and a pick, then rake the pins."]
    requests = [evaluator.request(text, "a") for text in texts]
    requests.append(Score("a", "evaluate", chat_ids(hf, PROMPTS[2]), [[504], [504, 3575]], (3575, 314, 28)))
    mirror = [Score("b", r.phase, r.prefix, r.suffixes, r.option_ids) for r in requests]
    ours = run_requests(hf.backend, requests)
    theirs = run_requests(vrain.backend, mirror)
    for a, b, r in zip(ours, theirs, requests):
        assert b.shape == (len(r.suffixes), len(r.option_ids))
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert max(float(a.max()) for a in ours) > 0.05  # not only vanishing probabilities compared


def test_top_tokens_agree(hf, vrain):
    contexts = [chat_ids(hf, p) for p in PROMPTS[:2]]
    contexts.append(contexts[0] + [34416, 253])
    for n in (10, 20):
        ours = run_requests(hf.backend, [TopTokens("a", "expand", c, n) for c in contexts])
        theirs = run_requests(vrain.backend, [TopTokens("b", "expand", c, n) for c in contexts])
        for a, b in zip(ours, theirs):
            assert [t for t, _ in b] == [t for t, _ in a]
            # HF gives logits, vLLM log-probabilities: the same up to a per-context constant
            np.testing.assert_allclose([v - b[0][1] for _, v in b], [v - a[0][1] for _, v in a], atol=2e-4)


def test_scoring_beside_top_tokens_in_flight(hf, vrain):
    """vLLM 0.32 hands a batch holding a logprob_token_ids request that request's logprobs for every
    request in it (PR #51789): the backend keeps scoring apart, so all come back right together."""
    context = chat_ids(hf, PROMPTS[0])
    score = Score("a", "evaluate", context, [[504], [34416]], (253, 314))
    tops = [TopTokens(owner, "expand", context + extra, 10) for owner, extra in (("a", []), ("b", [34416]))]
    mixed = run_requests(vrain.backend, [tops[0], score, tops[1], Score("c", "evaluate", context, [[49]], (50,))])
    alone = run_requests(hf.backend, [TopTokens("x", "expand", t.context, 10) for t in tops] + [score])
    for got, want in zip([mixed[0], mixed[2]], alone[:2]):
        assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose(mixed[1], alone[2], atol=1e-4, rtol=0)


def test_greedy_vanilla_equals_the_transformers_backend(hf, vrain):
    for prompt in PROMPTS[:2]:
        ours = hf.generate(prompt, method="vanilla", max_new_tokens=24)
        theirs = vrain.generate(prompt, method="vanilla", max_new_tokens=24)
        assert theirs.token_ids == ours.token_ids and theirs.text == ours.text
        assert theirs.stats.engine == f"vllm:{NAME}" and theirs.stats.compute.phases["generate"].tokens > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # the HH and AdvBench presets' temperatures
def test_sampled_priors_equal_teacher_forced_log_probabilities(hf, vrain, temperature):
    context = chat_ids(hf, PROMPTS[0])
    rows = [Row(4, temperature, 15, greedy=True)] + [Row(4, temperature, 15) for _ in range(6)]
    uniforms = np.random.default_rng(3).random((len(rows), 4))
    (samples,) = run_requests(vrain.backend, [SampleRows("a", "expand", context, rows, uniforms)])
    assert len({tuple(s.tokens) for s in samples[1:]}) > 1  # the sampled rows differ (seeds seed + i)
    (ours,) = run_requests(hf.backend, [SampleRows("a", "expand", context, rows[:1])])
    assert samples[0].tokens == ours[0].tokens  # the greedy row
    for s in samples:
        assert 1 <= len(s.tokens) <= 4
        assert abs(s.logprob - teacher_forced(hf.model, context, s.tokens, temperature, 15)) < 1e-3
    # the candidates' priors (greedy first, distinct samples) follow from those log-probabilities
    forced = [type(s)(s.tokens, teacher_forced(hf.model, context, s.tokens, temperature, 15)) for s in samples]
    for (t1, p1), (t2, p2) in zip(candidates_from(samples, 5), candidates_from(forced, 5)):
        assert t1 == t2 and abs(p1 - p2) < 1e-3 * max(p1, 1e-3)
    # the same uniforms draw the same rows again: an answer's samples are reproducible
    (again,) = run_requests(vrain.backend, [SampleRows("a", "expand", context, rows, uniforms)])
    assert [s.tokens for s in again] == [s.tokens for s in samples]


def test_rollouts_end_at_the_first_punctuation_token(vrain):
    context = chat_ids(vrain, PROMPTS[0])
    rows = [Row(48, 1.0, 0, stop=TextStop(STOP_CHARS, (), ()))] * 6
    (samples,) = run_requests(vrain.backend, [SampleRows("a", "simulate", context, rows,
                                                         np.random.default_rng(5).random((6, 48)))])
    decode = vrain.codec.decode
    ended = 0
    for s in samples:
        for i in range(1, len(s.tokens)):  # no earlier token ends the clause
            assert not decode(s.tokens[:i]).endswith(tuple(STOP_CHARS)), decode(s.tokens)
        last = decode(s.tokens)
        assert last.endswith(tuple(STOP_CHARS)) or s.tokens[-1] in vrain.codec.stop_ids or len(s.tokens) == 48
        ended += last.endswith(tuple(STOP_CHARS))
        assert np.isfinite(s.logprob) and s.logprob < 0
    assert ended >= 3


# ---------------------------------------------------------------------------------------------- RAIN on vLLM
def test_rain_end_to_end_on_vllm(vrain):
    out = vrain.generate(PROMPTS[0], load_config("fast", max_new_tokens=8, t_max=3))
    stats = out.stats
    assert out.text.strip() and stats.engine == f"vllm:{NAME}" and stats.iterations >= 3
    phases = stats.compute.phases
    assert {"expand", "simulate", "evaluate", "embed"} <= set(phases)
    assert phases["expand"].tokens > 0 and phases["evaluate"].requests > 0
    assert stats.to_dict()["engine"] == f"vllm:{NAME}"


def metrics(url: str) -> dict[str, float]:
    """The server's own counters: prompt tokens it computed (not found cached) and tokens it generated."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    found = {"computed": 0.0, "generated": 0.0}
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{") and 'source="local_compute"' in line:
            found["computed"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:generation_tokens_total{"):
            found["generated"] += float(line.rsplit(" ", 1)[1])
    return found


def test_tokens_processed_are_what_the_server_computed(server):
    """Every answer's tokens processed equal the server's own counters over the same work (each body
    holds one prompt and one choice, so its usage is exact), and never fall below the least work
    (a cache salt of its own: nothing of earlier tests is found cached)."""
    import uuid

    rain = Rain.connect(server.url, salt=uuid.uuid4().hex)
    for prompts, config in (([PROMPTS[1]], load_config("fast", max_new_tokens=8, t_max=4)),
                            (PROMPTS[:2], load_config("fast", max_new_tokens=6, t_max=3, seed=2))):
        before = metrics(server.url)
        outs = rain.generate_many(prompts, config)
        after = metrics(server.url)
        served = sum(after[k] - before[k] for k in after)
        counted = sum(o.stats.compute.lm_tokens for o in outs)
        assert abs(counted - served) <= 0.02 * served, (counted, served)
        for out in outs:
            assert out.stats.compute.lm_tokens >= out.stats.compute.least_work


def test_a_whole_search_on_vllm_equals_the_same_search_on_transformers(hf, vrain):
    """Where no sampling can differ (one-token sets: candidates are the top tokens; greedy rollouts;
    the vote value), RAIN on vLLM makes the same search as on the transformers engine: every step's
    tree, node by node (visits, values, priors, similarity updates, dynamic additions)."""
    config = load_config("fast", token_set_lengths=(1,), rollout_temperature=0.0, num_candidates=3, t_max=8,
                         t_min=2, max_new_tokens=5, max_rollout_tokens=12, value_mode="vote", dynamic_max_children=6,
                         similarity_threshold=0.6, dynamic_variance_scale=1.0, dynamic_q_threshold=1.01)
    # (a lower similarity threshold and a looser dynamic-addition rule than the paper's, so that both
    # rewind mechanisms act in a search this small and their results are compared too)

    def same(a: dict, b: dict, where: str) -> None:
        assert a["tokens"] == b["tokens"], where
        assert (a["visits"], a["similarity_updates"], a["dynamic"]) == \
            (b["visits"], b["similarity_updates"], b["dynamic"]), where
        assert a["n"] == pytest.approx(b["n"], abs=1e-6) and a["value"] == pytest.approx(b["value"], abs=1e-6), where
        assert a["prior"] == pytest.approx(b["prior"], abs=1e-4), where
        assert len(a["children"]) == len(b["children"]), where
        for i, (x, y) in enumerate(zip(a["children"], b["children"])):
            same(x, y, f"{where}/{i}")

    updates = added = 0
    for prompt in PROMPTS[:2]:
        ours, theirs = hf.generate(prompt, config, trace=True), vrain.generate(prompt, config, trace=True)
        assert theirs.token_ids == ours.token_ids
        assert theirs.stats.to_dict()["iterations_per_step"] == ours.stats.to_dict()["iterations_per_step"]
        for name in ("nodes", "rewinds", "similarity_updates", "dynamic_additions", "value_cache_hits"):
            assert theirs.stats.to_dict()[name] == ours.stats.to_dict()[name], name
        for step, (a, b) in enumerate(zip(ours.trace, theirs.trace, strict=True)):
            same(a["tree"], b["tree"], f"{prompt[:12]}: step {step}")
        updates += ours.stats.search.similarity_updates
        added += ours.stats.search.dynamic_additions
    assert updates > 0 and added > 0  # the comparison covered both rewind mechanisms


class RejectedLater:
    """A value whose evaluator asks the model correctly at first, then (from its third evaluation)
    with a prompt longer than the server's --max-model-len: a request the server refuses mid-search."""

    name = "rejected-later"

    def __init__(self, rain: Rain):
        self.inner = rain.value_source(load_config("fast"))

    def bind(self, prompt):
        evaluator = self.inner.bind(prompt)
        calls, request = [0], evaluator.request

        def late(response, owner=None):
            calls[0] += 1
            score = request(response, owner)
            if calls[0] >= 3:
                score.prefix = score.prefix * 40
            return score

        evaluator.request = late
        return evaluator


def test_a_request_the_server_refuses_mid_search_fails_that_answer_alone(vrain):
    from rain_llm.runtime.scheduler import Failure

    config = load_config("fast", max_new_tokens=6, t_max=3)
    alone = vrain.generate(PROMPTS[0], config)
    batch = vrain.continuous_batch()
    batch.add("good", PROMPTS[0], config)
    batch.add("bad", PROMPTS[1], config, value_fn=RejectedLater(vrain))
    out = {}
    for step in batch.drain([], max_in_flight=2):
        out.update(step.finished)
    failure = out["bad"]
    assert isinstance(failure, Failure) and failure.status == 400, failure
    assert "--max-model-len" in failure.message and "\n" not in failure.message
    assert out["good"].token_ids == alone.token_ids
    assert out["good"].stats.iterations_per_step == alone.stats.iterations_per_step
    assert vrain.backend.in_flight() == 0


def test_settings_the_server_cannot_serve_are_refused_before_any_work(vrain):
    assert vrain.backend.max_logprobs == 20  # probed: the server's --max-logprobs
    before = vrain.backend.http_requests
    with pytest.raises(RainError) as err:
        vrain.generate(PROMPTS[0], load_config("fast", num_candidates=25))
    one_line(err, "num_candidates=25", "--max-logprobs 25")
    with pytest.raises(RainError) as err:
        vrain.generate(PROMPTS[0], load_config("fast", top_k=30))
    one_line(err, "top_k=30", "--max-logprobs 30")
    assert vrain.backend.http_requests == before


def test_answers_in_flight_at_once(server):

    rain = Rain.connect(server.url)  # a fresh backend: its own count of requests in flight
    outs = rain.generate_many(PROMPTS, method="vanilla", max_new_tokens=12)
    assert rain.backend.peak_in_flight >= 2  # the three answers' requests were sent together
    alone = [rain.generate(p, method="vanilla", max_new_tokens=12).token_ids for p in PROMPTS]
    assert [o.token_ids for o in outs] == alone


def test_each_answer_stays_on_one_server(server):
    """Two servers (the same one, by two names: one server is what this machine affords): answers
    are spread over them, and all of an answer's requests go to the server it started on."""

    urls = [server.url, f"http://localhost:{server.port}"]
    rain = Rain.connect(urls)
    outs = rain.generate_many(PROMPTS, load_config("fast", max_new_tokens=4, t_max=2))
    assert all(o.text.strip() for o in outs)
    seen = defaultdict(set)
    for owner, url in rain.backend.routes():
        seen[owner].add(url)
    per_answer = {key: seen[key] for key in range(len(PROMPTS))}
    assert all(len(found) == 1 for found in per_answer.values()), per_answer
    assert set().union(*per_answer.values()) == set(urls)
    assert not rain.backend.shared.pins  # released when the answers ended


def test_no_reuse_scope_shares_no_cache(vrain):
    again = vrain.generate(PROMPTS[0], method="vanilla", max_new_tokens=8)
    salted = vrain.generate(PROMPTS[0], method="vanilla", max_new_tokens=8, reuse_cache=False)
    assert salted.token_ids == again.token_ids
    # with its own cache_salt the prompt is computed again: the server reports no cached tokens
    assert salted.stats.compute.total().tokens == salted.stats.prompt_tokens + len(salted.token_ids)
    assert again.stats.compute.total().tokens < salted.stats.compute.total().tokens


# ---------------------------------------------------------------------------------------------- errors
def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


def test_wrong_url_nothing_listening_and_model_name(server, vrain):
    from rain_llm.engine.vllm import VLLMBackend
    from rain_llm.engine.vllm.client import Client
    from rain_llm.engine.vllm.wire import Wire

    with pytest.raises(RainError) as err:
        Rain.connect(server.url + "/nope")
    one_line(err, server.url + "/nope", "/v1/models", "base URL")
    port = free_port()
    with pytest.raises(RainError) as err:
        Rain.connect(f"http://127.0.0.1:{port}")
    one_line(err, f"127.0.0.1:{port}", "cannot reach", "--engine-url")
    with pytest.raises(RainError) as err:
        Rain.connect(server.url, name="nope")
    one_line(err, server.url, "'smol'", "'nope'")
    client = Client()
    wrong = VLLMBackend([client.server(server.url)], client, Wire("nope", vrain.codec), context_window=2048,
                        max_logprobs=20)
    with pytest.raises(RainError) as err:
        run_requests(wrong, [TopTokens("a", "expand", [1, 2, 3], 2)])
    one_line(err, server.url, "nope")


def test_prompt_over_the_servers_length_and_logprobs_limit(server, vrain):
    assert vrain.backend.context_window == 2048  # the server's --max-model-len
    with pytest.raises(RainError) as err:
        vrain.generate("lock " * 2100, method="vanilla", max_new_tokens=4)
    one_line(err, "prompt too long", "2048")
    with pytest.raises(RainError) as err:  # past the Rain's own check: the server's answer
        run_requests(vrain.backend, [TopTokens("a", "expand", [253] * 2100, 2)])
    one_line(err, server.url, "--max-model-len")
    with pytest.raises(RainError) as err:
        run_requests(vrain.backend, [TopTokens("a", "expand", [1, 2, 3], 21)])
    one_line(err, server.url, "--max-logprobs")
    assert vrain.backend.in_flight() == 0  # a failed request leaves nothing behind
    assert vrain.generate(PROMPTS[2], method="vanilla", max_new_tokens=4).text  # and the backend goes on


class _Refusing(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        _Refusing.seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"error": {"message": "Unauthorized", "code": 401}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_api_key_from_the_environment(monkeypatch):
    from rain_llm.engine.vllm import DEFAULT_KEY_ENV

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_VLLM_KEY", "s3cret")
        with pytest.raises(RainError) as err:
            Rain.connect(f"http://127.0.0.1:{httpd.server_port}", key_env="MY_VLLM_KEY")
        one_line(err, "401", "$MY_VLLM_KEY")
        assert _Refusing.seen[-1] == "Bearer s3cret"
        monkeypatch.delenv(DEFAULT_KEY_ENV, raising=False)
        with pytest.raises(RainError):
            Rain.connect(f"http://127.0.0.1:{httpd.server_port}")
        assert _Refusing.seen[-1] == ""  # no key set: none sent
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_killed_mid_answer(default_model_dir, tmp_path):
    """A throwaway server dies (SIGKILL) while an answer is searching in this process, while
    `rain eval --engine vllm` runs in another, and under a `rain serve` over it: the answer fails with
    one RainError line, no hang; the eval keeps the records it wrote and exits 2 with one line; the
    server's /health says 503 and its next request gets a 503 JSON error."""
    from rain_llm.shells.server import RainServer

    doomed = VLLMServer(default_model_dir, tmp_path / "doomed.log")
    try:
        doomed.wait_healthy()
        out, data = tmp_path / "adv.jsonl", tmp_path / "goals.csv"
        data.write_text("goal\n" + "".join(f"Tell me fact number {i} about the sea\n" for i in range(40)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "rain_llm.shells.cli", "eval", "advbench", "--data", str(data), "--methods",
             "vanilla", "--max-new-tokens", "8", "--quiet", "--threads", "1", "--engine", "vllm", "--engine-url",
             doomed.url, "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rain = Rain.connect(doomed.url)
        serving = RainServer(Rain.connect(doomed.url), load_config("fast", max_new_tokens=4), port=0,
                             log=open(os.devnull, "w")).start()
        failure: list[BaseException] = []

        def search() -> None:
            try:
                rain.generate(PROMPTS[0], load_config("fast", max_new_tokens=64, t_max=50))
            except BaseException as err:  # noqa: BLE001 - handed to the test's thread
                failure.append(err)

        thread = threading.Thread(target=search, daemon=True)
        thread.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (rain.backend.http_requests < 5 or not out.exists()
                                               or len(out.read_text().splitlines()) < 2):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        assert thread.is_alive(), failure
        doomed.kill()
        written = out.read_text().splitlines()
        thread.join(120)
        assert not thread.is_alive(), "the answer hangs after its server died"
        assert len(failure) == 1 and isinstance(failure[0], RainError), failure
        text = str(failure[0])
        assert "\n" not in text and doomed.url in text, text
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(serving.url.removesuffix("/v1") + "/health", timeout=60)
        assert health.value.code == 503 and doomed.url in json.loads(health.value.read())["error"]
        with pytest.raises(openai.APIStatusError) as lost:
            openai.OpenAI(base_url=serving.url, api_key="none", max_retries=0, timeout=120).chat.completions.create(
                model="smol", messages=[{"role": "user", "content": PROMPTS[1]}], extra_body={"rain": {"t_max": 2}})
        assert lost.value.status_code == 503 and doomed.url in lost.value.message
        _, stderr = proc.communicate(timeout=120)
    finally:
        if "serving" in locals():
            serving.close()
        doomed.stop()
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("rain: error:")]
    assert len(lines) == 1 and doomed.url in lines[0] and "Traceback" not in stderr, stderr
    kept = out.read_text().splitlines()
    assert kept[:len(written)] == written and len(kept) >= 2  # what was written stays
    assert all(json.loads(x)["method"] == "vanilla" for x in kept)


def test_rain_serve_on_vllm_through_the_openai_client(vrain, hf):
    """`rain serve --engine vllm` as users reach it: the official client gets the answer the
    transformers engine gives (greedy); the caps follow the server's --max-logprobs, so a request
    above them is refused with a 400 naming the setting, and a request beside it is answered."""
    from rain_llm.shells.server import RainServer

    log = io.StringIO()
    with RainServer(vrain, load_config("fast", max_new_tokens=6), port=0, log=log) as srv:
        assert srv.limits.max_candidates == 20 and "--max-logprobs" in log.getvalue()
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=300)

        def ask(**rain):
            return client.chat.completions.create(model="smol", messages=[{"role": "user", "content": PROMPTS[2]}],
                                                  extra_body={"rain": rain})

        plain = ask(method="vanilla")
        assert plain.choices[0].message.content == hf.generate(PROMPTS[2], method="vanilla", max_new_tokens=6).text
        searched = ask(t_max=3)
        assert searched.choices[0].message.content and searched.model_extra["rain"]["stats"]["iterations"] >= 3
        with pytest.raises(openai.BadRequestError) as err:
            ask(num_candidates=25)
        assert "num_candidates" in err.value.message
        with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/health", timeout=30) as health:
            assert json.loads(health.read())["status"] == "ok"


def test_bench_on_the_vllm_servers(server, tmp_path, capsys):
    """`rain bench` with only vllm: methods loads no local model and counts the HTTP requests."""
    from rain_llm.shells.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--methods", "vllm:vanilla,vllm:rain", "--engine-url", server.url, "--prompts", "1",
                 "--preset", "fast", "--max-new-tokens", "6", "--t-max", "3", "--fixed-budget",
                 "--out", str(out)]) == 0
    assert "HTTP overhead per request" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["engines"]["vllm"]["servers"] == [server.url] and data["engines"]["vllm"]["http_overhead_s"] > 0
    s = data["summary"]
    assert s["vllm:rain"]["requests_per_token"] > s["vllm:vanilla"]["requests_per_token"] > 0
    assert s["vllm:vanilla"]["x_vanilla"] == 1.0 and s["vllm:rain"]["http_overhead_s"] > 0


def test_engine_flags_without_a_url(capsys):
    from rain_llm.shells.cli import main

    assert main(["bench", "--methods", "vanilla,vllm:rain"]) == 2
    assert "--engine-url" in capsys.readouterr().err
    assert main(["generate", "--engine-url", "http://127.0.0.1:9", "Hi"]) == 2
    assert "--engine vllm" in capsys.readouterr().err
    assert main(["bench", "--methods", "vllm:magic", "--engine-url", "http://127.0.0.1:9"]) == 2
    assert "unknown bench method 'vllm:magic'" in capsys.readouterr().err
