"""`rain serve` against the official `openai` client: answers equal `Rain.generate`'s, requests
that arrive together are answered in one lockstep batch, and every bad request gets a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from rain_llm import Rain, load_config
from rain_llm.shells.cli import main
from rain_llm.shells.server import RainServer

PROMPTS = ["How do I pick a lock?", "Hi", "Write a story about a dragon."]
SEARCH = {"t_max": 3, "t_min": 2, "max_rollout_tokens": 6}


@pytest.fixture(scope="module")
def rain(tokenizer):
    from conftest import tiny_model
    from rain_llm.values.embedder import MiniLMEmbedder

    return Rain(tiny_model("llama", len(tokenizer)), tokenizer, embedder=MiniLMEmbedder.load(), name="tiny")


@pytest.fixture()
def server(rain):
    log = open(os.devnull, "w")
    with RainServer(rain, load_config("fast", max_new_tokens=8), port=0, batch_window=1.0, log=log) as srv:
        yield srv
    log.close()


def client(srv: RainServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=300)


def ask(srv: RainServer, prompt: str, **kw):
    return client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kw)


def concurrently(fn, n: int) -> list:
    out: list = [None] * n

    def go(i: int) -> None:
        try:
            out[i] = fn(i)
        except Exception as err:  # surfaced by the assertions below
            out[i] = err

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_requests_are_one_lockstep_batch_with_the_same_answers(server, rain):
    replies = concurrently(lambda i: ask(server, PROMPTS[i], max_tokens=8, seed=3, extra_body={"rain": SEARCH}),
                           len(PROMPTS))
    alone = [rain.generate(p, load_config("fast", max_new_tokens=8, seed=3, **SEARCH)) for p in PROMPTS]
    for reply, gen, prompt in zip(replies, alone, PROMPTS):
        assert not isinstance(reply, Exception), reply
        assert reply.choices[0].message.content == gen.text
        stats = reply.model_extra["rain"]["stats"]
        assert stats["batch"] == len(PROMPTS) and stats["iterations_per_step"] == gen.stats.iterations_per_step
        assert reply.usage.completion_tokens == len(gen.token_ids)
        assert reply.usage.prompt_tokens == len(rain.prepare(prompt, load_config("fast"))[1])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.model == "tiny"


def test_requests_with_different_settings_share_the_batch(server, rain):
    settings = [{"method": "vanilla"}, SEARCH, {"method": "vanilla"}, {**SEARCH, "t_max": 4, "seed": 7}]
    replies = concurrently(lambda i: ask(server, PROMPTS[i % 3], max_tokens=6, extra_body={"rain": settings[i]}), 4)
    for i, reply in enumerate(replies):
        expected = rain.generate(PROMPTS[i % 3], load_config("fast", max_new_tokens=6, **settings[i]))
        assert reply.choices[0].message.content == expected.text
        assert reply.model_extra["rain"]["method"] == expected.method
    assert [r.model_extra["rain"]["stats"].get("batch", 1) for r in replies] == [4, 4, 4, 4]


def test_a_request_joins_a_running_search_and_need_not_wait_for_it(server, rain):
    """Continuous batching: a short vanilla request sent while a long RAIN search runs is answered
    before that search ends, and the search's answer is unchanged."""
    search = {**SEARCH, "t_max": 6, "t_min": 6, "value_threshold": 2.0}
    long = {"max_tokens": 40, "extra_body": {"rain": search}}
    finished: dict[str, float] = {}

    def go(i: int):
        if i == 0:
            reply = ask(server, PROMPTS[2], **long)
        else:
            while not server.worker.in_flight:  # wait until the search is running
                time.sleep(0.01)
            reply = ask(server, "Hi", max_tokens=4, extra_body={"rain": {"method": "vanilla"}})
        finished[str(i)] = time.monotonic()
        return reply

    replies = concurrently(go, 2)
    assert finished["1"] < finished["0"]
    expected = rain.generate(PROMPTS[2], load_config("fast", max_new_tokens=40, **search))
    assert replies[0].choices[0].message.content == expected.text
    assert replies[0].model_extra["rain"]["stats"]["batch"] == 2


def test_stream_sends_text_as_the_search_commits_it(server, rain, monkeypatch):
    """RAIN never revises a commit, so a streamed answer arrives step by step: the worker sends
    each piece of text in the round its search commits it (several rounds apart, the first long
    before the answer is done), and the pieces add up to the answer `rain generate` gives."""
    from rain_llm.api import ContinuousBatch
    from rain_llm.shells import server as server_module

    events: list[tuple[str, int]] = []
    rounds = [0]
    step, send = ContinuousBatch.step, server_module.Job.send

    def counted_step(self):
        rounds[0] += 1
        return step(self)

    def logged_send(self, text):
        before = self.sent
        send(self, text)
        if self.sent != before:
            events.append(("delta", rounds[0]))

    monkeypatch.setattr(ContinuousBatch, "step", counted_step)
    monkeypatch.setattr(server_module.Job, "send", logged_send)
    settings = {**SEARCH, "t_max": 4, "value_threshold": 2.0}
    stream = ask(server, PROMPTS[2], max_tokens=24, stream=True, extra_body={"rain": settings})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    expected = rain.generate(PROMPTS[2], load_config("fast", max_new_tokens=24, **settings))
    assert "".join(contents) == expected.text
    assert len(contents) >= 3 and len(expected.stats.iterations_per_step) >= 3
    delta_rounds = [r for _, r in events]
    assert len(set(delta_rounds)) >= 3  # sent in different rounds, as the search committed
    assert delta_rounds[0] < rounds[0] / 2  # the first piece long before the last round
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and last.usage.completion_tokens == len(
        expected.token_ids)


def test_stream_delivers_the_same_answer(server):
    settings = {"max_tokens": 6, "extra_body": {"rain": {"method": "vanilla"}}}
    whole = ask(server, "Hi", **settings)
    chunks = list(ask(server, "Hi", stream=True, **settings))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6


def test_a_conversation_with_a_system_message(server, rain):
    """System message and earlier turns go through the chat template; the answer is the one the
    Python API gives for the same conversation."""
    conversation = [{"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": [{"type": "text", "text": "How do I pick a lock?"}]}]
    reply = client(server).chat.completions.create(model="tiny", messages=conversation, max_tokens=6,
                                                   extra_body={"rain": SEARCH})
    as_text = [*conversation[:3], {"role": "user", "content": "How do I pick a lock?"}]
    expected = rain.generate(as_text, load_config("fast", max_new_tokens=6, **SEARCH))
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(rain.prepare(as_text, load_config("fast"))[1])
    assert reply.usage.prompt_tokens > len(rain.prepare("How do I pick a lock?", load_config("fast"))[1])


def test_models_endpoint(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]


@pytest.mark.parametrize("kwargs, status, words", [
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty prompt"),
    ({"model": "gpt-4"}, 404, "model 'gpt-4' not found"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, 400,
     "the last message must be the user's"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "Hi"}]}, 400, "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                   {"role": "user", "content": "Hi"}]}, 400, "system messages must come before"),
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
    ({"extra_body": {"rain": {"t_max": 0}}}, 400, "invalid config value t_max=0"),
    ({"extra_body": {"rain": {"no_such_key": 1}}}, 400, "unknown RAIN setting 'no_such_key'"),
    ({"extra_body": {"rain": {"value": "reward:/some/model"}}}, 400, "fixed by the server"),
    ({"extra_body": {"rain": {"template": "/etc/passwd"}}}, 400, "built-in template only"),
    ({"max_tokens": 0}, 400, "invalid config value max_new_tokens=0"),
    ({"n": 2}, 400, "'n' must be 1"),
    ({"stop": ["\n"]}, 400, "'stop' is not supported"),
    ({"temperature": 0}, 400, "temperature=0"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "prompt too long"),
    ({"messages": [{"role": "user", "content": "word " * 9000}], "stream": True}, 400, "prompt too long"),
])
def test_bad_requests_get_one_clear_error(server, kwargs, status, words):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(**request)
    assert caught.value.status_code == status
    message = caught.value.body["message"]
    assert words in message and "\n" not in message and "Traceback" not in message


def raw_post(srv: RainServer, path: str, data: bytes) -> tuple[int, dict]:
    url = srv.url.removesuffix("/v1") + path
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_malformed_bodies_and_unknown_endpoints(server):
    status, body = raw_post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["message"].startswith("malformed request: the body is not valid JSON")
    status, body = raw_post(server, "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    status, body = raw_post(server, "/v1/completions", b"{}")
    assert status == 404 and "/v1/chat/completions" in body["error"]["message"]


def test_a_bad_prompt_does_not_fail_the_batch_it_arrived_with(server, rain):
    prompts = ["Hi", "word " * 9000, "Why is the sky blue?"]
    replies = concurrently(lambda i: ask(server, prompts[i], max_tokens=5, extra_body={"rain": {"method": "vanilla"}}),
                           3)
    assert isinstance(replies[1], openai.BadRequestError) and "prompt too long" in replies[1].body["message"]
    for i in (0, 2):
        expected = rain.generate(prompts[i], load_config("fast", max_new_tokens=5, method="vanilla"))
        assert replies[i].choices[0].message.content == expected.text


def test_cli_rejects_bad_server_settings(capsys):
    for args, words in [(["--port", "70000"], "invalid --port 70000"), (["--max-batch", "0"], "invalid --max-batch"),
                        (["--batch-window", "-1"], "invalid --batch-window"), (["--t-max", "0"], "t_max=0")]:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rain: error:") and words in err[0], err


def test_cli_reports_a_busy_port_before_loading(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0], err


def test_rain_serve_end_to_end_on_the_default_model(default_model_dir):
    """The real command in its own process: ready line, one answer through the official client, Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "rain_llm.shells.cli", "serve", "--port", "0", "--method", "vanilla",
                             "--max-new-tokens", "6"], stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stderr.readline()
        assert "serving 'default' at http://127.0.0.1:" in ready, ready
        url = ready.split(" at ")[1].split()[0]
        reply = openai.OpenAI(base_url=url, api_key="none", max_retries=0).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "How do I pick a lock?"}])
        expected = Rain.load().generate("How do I pick a lock?", load_config(max_new_tokens=6, method="vanilla"))
        assert reply.choices[0].message.content == expected.text and reply.usage.completion_tokens == 6
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_search(server, rain, stream):
    """A long search whose client closed the connection is cancelled (never answered, its cache
    freed), and the server goes on answering."""
    import socket

    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 60,
                       "stream": stream, "rain": {**SEARCH, "t_max": 40, "t_min": 40, "value_threshold": 2.0}})
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port)) as conn:
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 60
        while not server.worker.in_flight and time.monotonic() < deadline:  # the search is running
            time.sleep(0.01)
        (job,) = server.worker.in_flight
    job.done.wait(300)
    assert job.done.is_set() and job.cancelled and job.result is None  # stopped, not answered
    assert not server.worker.in_flight
    reply = ask(server, "Hi", max_tokens=4, extra_body={"rain": {"method": "vanilla"}})
    assert reply.choices[0].message.content
    assert rain.backend.engine.prefix_cache.num_tokens() < 1000  # the cancelled search's cache was freed
