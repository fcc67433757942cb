"""`rain serve` checks every request before it goes near the model: each bad one gets a 4xx whose
one-line message names the problem (grammatical: "must be an integer") and whose `param` names the
field; bodies no JSON encoder or decoder can take (huge integers, lone surrogates) get 400, not 500."""

from __future__ import annotations

import json

import openai
import pytest

from rain_llm import load_config
from server_helpers import CHAT, HeldServer, Log, answers_normally, client, raw


@pytest.fixture(scope="module")
def server(tiny_rain):
    cfg = load_config("fast", max_new_tokens=8, max_rollout_tokens=6, t_max=3)  # small: the model has 512 positions
    with HeldServer(tiny_rain, cfg, port=0, log=Log()) as srv:
        yield srv


RAIN = "extra_body"


@pytest.mark.parametrize("kwargs, status, words, param", [
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty prompt", "messages"),
    ({"model": "gpt-4"}, 404, "model 'gpt-4' not found", "model"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, 400,
     "the last message must be the user's", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "Hi"}]}, 400, "unknown role 'tool'",
     "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                   {"role": "user", "content": "Hi"}]}, 400, "system messages must come before", "messages"),
    ({"messages": []}, 400, "'messages' must be a non-empty list", "messages"),
    ({RAIN: {"rain": {"t_max": 0}}}, 400, "invalid config value t_max=0", "rain.t_max"),
    ({RAIN: {"rain": {"t_max": 10 ** 6}}}, 400, "over this server's cap of 200 (rain serve --limit-t-max)",
     "rain.t_max"),
    ({RAIN: {"rain": {"t_min": 10 ** 6, "t_max": 10 ** 6}}}, 400, "--limit-t-max", "rain.t_max"),
    ({RAIN: {"rain": {"t_min": 9, "t_max": 3}}}, 400, "t_min=9 is greater than t_max=3", "rain.t_min"),
    ({RAIN: {"rain": {"sample_attempts": 10 ** 6}}}, 400, "--limit-candidates", "rain.sample_attempts"),
    ({RAIN: {"rain": {"parallel_leaves": 99}}}, 400, "--limit-parallel-leaves", "rain.parallel_leaves"),
    ({RAIN: {"rain": {"max_rollout_tokens": 10 ** 5}}}, 400, "--limit-rollout-tokens", "rain.max_rollout_tokens"),
    ({RAIN: {"rain": {"token_set_lengths": [1, 500]}}}, 400, "--limit-token-set-length", "rain.token_set_lengths"),
    ({RAIN: {"rain": {"max_search_seconds": 0}}}, 400, "over this server's cap of 600", "rain.max_search_seconds"),
    ({RAIN: {"rain": {"max_search_seconds": 10 ** 6}}}, 400, "--max-search-seconds", "rain.max_search_seconds"),
    ({"max_tokens": 10 ** 6}, 400, "max_tokens=1000000 is over this server's cap", "max_tokens"),
    ({"max_completion_tokens": 10 ** 6}, 400, "max_tokens=1000000 is over this server's cap",
     "max_completion_tokens"),
    ({"max_tokens": 2 ** 70}, 400, "invalid 'max_tokens': must be an integer in [", "max_tokens"),
    ({"max_tokens": 0}, 400, "invalid config value max_new_tokens=0", "max_tokens"),
    ({"max_completion_tokens": 0}, 400, "invalid config value max_new_tokens=0", "max_completion_tokens"),
    ({"seed": -1}, 400, "invalid 'seed': must be an integer in [0, ", "seed"),
    ({"seed": 2 ** 64}, 400, "invalid 'seed'", "seed"),
    ({"seed": 1.5}, 400, "invalid 'seed': must be an integer", "seed"),
    ({RAIN: {"rain": {"temperature": "1.5"}}}, 400, "invalid 'rain.temperature': must be a number",
     "rain.temperature"),
    ({"temperature": "1.5"}, 400, "invalid 'temperature': must be a number", "temperature"),
    ({"temperature": -1}, 400, "invalid config value temperature=-1", "temperature"),
    ({RAIN: {"rain": {"temperature": -1}}}, 400, "invalid config value temperature=-1", "rain.temperature"),
    ({RAIN: {"rain": {"c_puct": "2"}}}, 400, "invalid 'rain.c_puct': must be a number", "rain.c_puct"),
    ({RAIN: {"rain": {"c_puct": True}}}, 400, "invalid 'rain.c_puct': must be a number", "rain.c_puct"),
    ({RAIN: {"rain": {"t_max": 2.5}}}, 400, "invalid 'rain.t_max': must be an integer", "rain.t_max"),
    ({RAIN: {"rain": {"t_max": "3"}}}, 400, "invalid 'rain.t_max': must be an integer", "rain.t_max"),
    ({RAIN: {"rain": {"method": 1}}}, 400, "invalid 'rain.method': must be a string", "rain.method"),
    ({RAIN: {"rain": {"method": "greedy"}}}, 400, "invalid config value method='greedy'", "rain.method"),
    ({RAIN: {"rain": "fast"}}, 400, "invalid 'rain': must be a JSON object", "rain"),
    ({RAIN: {"stream": "yes"}}, 400, "invalid 'stream': must be true or false", "stream"),
    ({"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid 'messages.0.content': must be a string or a list", "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}, 400,
     "invalid 'messages.0.content.0.type': must be 'text'", "messages.0.content.0.type"),
    ({"model": 7}, 400, "invalid 'model': must be a string", "model"),
    ({RAIN: {"rain": {"no_such_key": 1}}}, 400, "unknown RAIN setting 'no_such_key'", "rain.no_such_key"),
    ({RAIN: {"rain": {"value": "reward:/some/model"}}}, 400, "fixed by the server", "rain.value"),
    ({RAIN: {"rain": {"template": "/etc/passwd"}}}, 400, "built-in template only", "rain.template"),
    ({"n": 2}, 400, "'n' must be 1", "n"),
    ({"top_p": 0.5}, 400, "'top_p' must be 1", "top_p"),
    ({"logprobs": True}, 400, "'logprobs' is not supported by RAIN", "logprobs"),
    ({"presence_penalty": 0.5}, 400, "'presence_penalty' is not supported by RAIN", "presence_penalty"),
    ({"stop": [""]}, 400, "'stop' strings must not be empty", "stop"),
    ({"stop": [f"s{i}" for i in range(17)]}, 400, "'stop' holds 17 strings, over this server's 16", "stop"),
    ({"stop": ["x" * 300]}, 400, "a 'stop' string of 300 characters", "stop"),
    ({RAIN: {"stop": 5}}, 400, "invalid 'stop': must be a string or a list", "stop"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "prompt too long", "messages"),
    ({"messages": [{"role": "user", "content": "word " * 9000}], "stream": True}, 400, "prompt too long",
     "messages"),
])
def test_bad_requests_get_one_clear_error(server, kwargs, status, words, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(**request)
    assert caught.value.status_code == status
    message = caught.value.body["message"]
    assert words in message and "\n" not in message and "Traceback" not in message, message
    assert " a integer" not in message and caught.value.body["param"] == param


def test_what_evaluation_clients_send_is_accepted(server):
    """lm-eval's and Inspect's requests as they were captured from the clients (stop strings,
    temperature 0, seed, max_tokens or max_completion_tokens), and the values that ask for what
    RAIN does anyway (n 1, top_p 1, logprobs false): answered, not refused."""
    captured = [  # lm-eval 0.4.13 local-chat-completions, generate_until; Inspect 0.3.285 openai-api
        {"messages": [{"role": "user", "content": "Question: What is 2 + 2?\nAnswer:"}], "model": "tiny",
         "max_tokens": 8, "temperature": 0, "stop": ["\n", "Question:"], "seed": 1234},
        {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8, "seed": 3,
         "temperature": 0.0},
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4, "n": 1,
         "top_p": 1, "logprobs": False, "stop": "\n\n", "user": "someone", "stream_options": None},
    ]
    for body in captured:
        status, reply, _ = raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 200, reply
        assert reply["choices"][0]["finish_reason"] in ("stop", "length") and reply["rain"]["method"] == "rain"


@pytest.mark.parametrize("body, status, words, param", [
    ({"prompt": [1, 2, 3]}, 400, "'prompt' as token ids is not supported: send the prompt as text", "prompt"),
    ({"prompt": [[1, 2], [3]]}, 400, "'prompt' as token ids is not supported", "prompt"),
    ({"prompt": ["a", "b"]}, 400, "'prompt' must be one text, not a list of 2", "prompt"),
    ({"prompt": "  "}, 400, "empty prompt", "prompt"),
    ({"prompt": 5}, 400, "invalid 'prompt': must be a string or a list", "prompt"),
    ({"prompt": "Hi", "logprobs": 1}, 400, "'logprobs' is not supported by RAIN: RAIN returns text", "logprobs"),
    ({"prompt": "Hi", "echo": True}, 400, "'echo' is not supported by RAIN", "echo"),
    ({"prompt": "Hi", "best_of": 3}, 400, "'best_of' is not supported by RAIN", "best_of"),
    ({"prompt": "Hi", "suffix": "x"}, 400, "'suffix' is not supported by RAIN", "suffix"),
    ({"prompt": "x" * (300 << 10)}, 400, "prompt too long: 307200 bytes", "prompt"),
    ({}, 400, "missing 'prompt'", "prompt"),
])
def test_bad_completion_requests(server, body, status, words, param):
    got, reply, _ = raw(server, "POST", "/v1/completions", json.dumps({"model": "tiny", **body}).encode())
    assert got == status, reply
    assert words in reply["error"]["message"] and reply["error"]["param"] == param, reply


@pytest.mark.parametrize("data, status, words, param", [
    (b"{not json", 400, "malformed request: the body is not valid JSON", None),
    (b"[1, 2]", 400, "must be a JSON object", None),
    (b"[" * 100000 + b"]" * 100000, 400, "nested too deeply", None),
    (json.dumps({**CHAT, "rain": {"c_puct": float("nan")}}).encode(), 400, "invalid 'rain.c_puct': must be a finite",
     "rain.c_puct"),
    (json.dumps({**CHAT, "rain": {"value_threshold": float("inf")}}).encode(), 400, "finite", "rain.value_threshold"),
    (json.dumps({**CHAT, "rain": {"max_search_seconds": float("nan")}}).encode(), 400, "finite",
     "rain.max_search_seconds"),
    (json.dumps({**CHAT, "rain": {"dynamic_variance_scale": float("-inf")}}).encode(), 400, "finite",
     "rain.dynamic_variance_scale"),
    (json.dumps({**CHAT, "temperature": float("inf")}).encode(), 400, "invalid 'temperature': must be a finite",
     "temperature"),
    (json.dumps({**CHAT, "temperature": 10 ** 400}).encode(), 400, "invalid 'temperature': must be a finite",
     "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi\\ud800"}]}', 400, "surrogate", "messages"),
    (json.dumps({**CHAT, "stop": ["a\ud800"]}).encode(), 400, "'stop' string holds an unpaired UTF-16 surrogate",
     "stop"),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (300 << 10)}]}).encode(), 400,
     "prompt too long: 307200 bytes", "messages"),
    # issue 19, 2: an integer literal longer than Python converts, in any field
    (json.dumps({**CHAT, "max_tokens": 7}).replace("7", "1" + "0" * 4999).encode(), 400,
     "a number in the body has more than 4300 digits", None),
    (b'{"model": "tiny", "x": ' + b"9" * 5000 + b"}", 400, "more than 4300 digits", None),
    # issue 19, 3: a lone surrogate as a key: named (escaped) in the message and param, not a 500
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "rain": {"\\ud800": 1}}', 400,
     "unknown RAIN setting '\\ud800'", "rain.\\ud800"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "rain": {"\\ud800\\n": 1}}', 400,
     "unknown RAIN setting '\\ud800\\n'", "rain.\\ud800\\n"),
])
def test_malformed_and_oversized_bodies(server, data, status, words, param):
    got, body, headers = raw(server, "POST", "/v1/chat/completions", data)
    assert got == status and headers["content-type"] == "application/json", body
    message = body["error"]["message"]
    assert words in message and "\n" not in message and body["error"]["param"] == param, body
    answers_normally(server)
