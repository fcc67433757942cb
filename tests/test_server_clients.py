"""`rain serve` as evaluation clients use it: stop strings (found across RAIN's token sets, the search
stopped there), temperature 0 (reproducible), /v1/completions, vanilla streamed token by token, and
the answer log that says which method answered."""

from __future__ import annotations

import json

import pytest

from rain_llm import load_config
from server_helpers import PROMPTS, SEARCH, HeldServer, Log, ask, client, sent_rounds

LONG = {**SEARCH, "t_max": 4, "value_threshold": 2.0}  # every step searches: several committed token sets


@pytest.fixture(scope="module")
def server(tiny_rain, tmp_path_factory):
    answers = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    with HeldServer(tiny_rain, load_config("fast", max_new_tokens=8), port=0, log=Log(), answer_log=answers) as srv:
        yield srv


def shown(tiny_rain, tokens: list[int]) -> str:
    """The answer text of these tokens, as the server shows it (chat format: stripped)."""
    return tiny_rain.codec.decode(tokens).strip()


def test_a_stop_string_split_across_token_sets_stops_the_search(server, tiny_rain):
    """A stop string made of the end of one committed token set and the start of the next is found:
    the answer is cut before it, finish_reason "stop", and the search stopped in the round that
    committed the second set (its tokens are the answer's so far: nothing searched past it)."""
    cfg = load_config("fast", max_new_tokens=24, **LONG)
    whole = tiny_rain.generate(PROMPTS[2], cfg, trace=True)
    ends, total = [], 0
    for step in whole.trace:
        total += len(step["committed"])
        ends.append(total)
    tokens = whole.token_ids
    for k in range(len(ends) - 1):  # a boundary with two characters on each side, the stop's first place
        before, after = shown(tiny_rain, tokens[:ends[k]]), shown(tiny_rain, tokens[:ends[k + 1]])
        at = len(before)
        stop = whole.text[at - 2:at + 2]
        if (at >= 2 and len(after) >= at + 2 and whole.text.startswith(after) and before == after[:at]
                and stop.strip() == stop and whole.text.find(stop) == at - 2):
            break
    else:
        pytest.fail(f"no boundary to test in {[s['committed_text'] for s in whole.trace]}")
    assert len(whole.trace[k]["committed"]) and len(whole.trace[k + 1]["committed"])
    reply = ask(server, PROMPTS[2], max_tokens=24, stop=["no such text", stop], extra_body={"rain": LONG})
    assert reply.choices[0].message.content == whole.text[:at - 2]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == ends[k + 1] < len(tokens)
    assert reply.model_extra["rain"]["stats"]["committed_steps"] == k + 2
    assert any(f"{reply.id} answered (rain, {ends[k + 1]} tokens" in line and "stopped at a stop string" in line
               for line in server.log.lines())


def test_a_stop_string_ends_a_stream_without_sending_it(server, tiny_rain):
    """Streamed, the same answer sends its text up to the stop string and never a character of it."""
    whole = tiny_rain.generate(PROMPTS[2], load_config("fast", max_new_tokens=24, **LONG))
    stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 3]
    expected = whole.text[:whole.text.find(stop)]
    chunks = list(ask(server, PROMPTS[2], max_tokens=24, stop=stop, stream=True, extra_body={"rain": LONG}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected and len(pieces) >= 2
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_vanilla_answer_stops_at_its_stop_string(server, tiny_rain):
    """Vanilla decoding stops in the round its text first holds the stop string."""
    cfg = load_config("fast", max_new_tokens=12, method="vanilla")
    whole = tiny_rain.generate(PROMPTS[0], cfg)
    stop = next(whole.text[i:i + 3] for i in range(4, len(whole.text)) if whole.text.find(whole.text[i:i + 3]) == i
                and whole.text[i:i + 3].strip() == whole.text[i:i + 3])
    first = next(n for n in range(1, 13) if stop in shown(tiny_rain, whole.token_ids[:n]))
    reply = ask(server, PROMPTS[0], max_tokens=12, stop=[stop], extra_body={"rain": {"method": "vanilla"}})
    assert reply.choices[0].message.content == whole.text[:whole.text.find(stop)]
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == first < 12


def test_stop_strings_that_never_come_change_nothing(server, tiny_rain):
    expected = tiny_rain.generate(PROMPTS[0], load_config("fast", max_new_tokens=8, **SEARCH))
    reply = ask(server, PROMPTS[0], max_tokens=8, stop=["\x07never"], extra_body={"rain": SEARCH})
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_temperature_zero_is_reproducible(server, tiny_rain):
    """temperature 0 asks for the same answer every time: RAIN keeps its candidate temperature and
    draws from its seed (the request's, else the server's), so repeated requests agree with each
    other and with `rain generate`; a positive temperature is RAIN's candidate temperature."""
    base = load_config("fast", max_new_tokens=8, **SEARCH)
    first, second = (ask(server, PROMPTS[0], max_tokens=8, temperature=0, extra_body={"rain": SEARCH})
                     for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content == tiny_rain.generate(
        PROMPTS[0], base).text
    seeded = ask(server, PROMPTS[0], max_tokens=8, temperature=0, seed=5, extra_body={"rain": SEARCH})
    assert seeded.choices[0].message.content == tiny_rain.generate(PROMPTS[0], base.replace(seed=5)).text
    warm = ask(server, PROMPTS[0], max_tokens=8, temperature=1.7, seed=5, extra_body={"rain": SEARCH})
    assert warm.choices[0].message.content == tiny_rain.generate(PROMPTS[0], base.replace(seed=5, temperature=1.7)).text


def test_completions_answer_a_plain_prompt(server, tiny_rain):
    """/v1/completions (what lm-eval's local-completions uses): the prompt is answered as one user
    message, the same answer as the chat endpoint and `rain generate` give; streamed the same."""
    expected = tiny_rain.generate(PROMPTS[1], load_config("fast", max_new_tokens=8, **SEARCH))
    api = client(server)
    reply = api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, extra_body={"rain": SEARCH})
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.model_extra["rain"]["method"] == "rain"
    listed = api.completions.create(model="tiny", prompt=[PROMPTS[1]], max_tokens=8, extra_body={"rain": SEARCH})
    assert listed.choices[0].text == expected.text
    chunks = list(api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, stream=True,
                                         extra_body={"rain": SEARCH}))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_vanilla_streams_token_by_token(server, tiny_rain, monkeypatch):
    """A vanilla stream sends text as it decodes, one round (one forward) at a time, not all at the
    end (issue 19, 7): the pieces arrive in many different rounds, the first in the first rounds."""
    rounds, sent = sent_rounds(monkeypatch)
    expected = tiny_rain.generate(PROMPTS[0], load_config("fast", max_new_tokens=16, method="vanilla"))
    chunks = list(ask(server, PROMPTS[0], max_tokens=16, stream=True, extra_body={"rain": {"method": "vanilla"}}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected.text
    assert len(set(sent)) >= 8 and sent[0] <= 3 < rounds[0]


def test_the_answer_log_says_which_method_answered(server):
    replies = [ask(server, "Hi", max_tokens=4, extra_body={"rain": {"method": method, **SEARCH}})
               for method in ("vanilla", "rain")]
    logged = {r["id"]: r for r in map(json.loads, server.answer_log_path.read_text().splitlines())}
    for reply, method in zip(replies, ("vanilla", "rain")):
        record = logged[reply.id]
        assert record["method"] == method == reply.model_extra["rain"]["method"]
        assert record["text"] == reply.choices[0].message.content and record["prompt"] == "Hi"
        assert record["finish_reason"] == reply.choices[0].finish_reason and record["object"] == "chat"
