"""Response builders (minilb.sim.formats) and knob validation: pure, no sockets."""

from __future__ import annotations

import msgspec
import pytest

from minilb.sim import formats
from minilb.sim.knobs import Knobs, KnobsError, update_knobs
from minilb.sim.requests import parse_generate, parse_openai


def test_output_text_is_deterministic() -> None:
    assert formats.output_text(3) == "tok0 tok1 tok2"
    assert formats.output_text(0) == ""


def test_prefill_result_has_input_logprobs_decode_has_none() -> None:
    req = parse_generate(b'{"input_ids": [7, 8, 9], "bootstrap_room": 1}', 4)
    item = req.items[0]
    p = formats.generate_result(item, 1, finished=True, prefill=True, logprob=True, latency=0.1)
    d = formats.generate_result(item, 4, finished=True, prefill=False, logprob=True, latency=0.1)
    assert [e[1] for e in p["meta_info"]["input_token_logprobs"]] == [7, 8, 9]
    assert all(e[2] is None for e in p["meta_info"]["input_token_logprobs"])
    assert d["meta_info"]["input_token_logprobs"] == []
    assert len(d["meta_info"]["output_token_logprobs"]) == 4
    assert d["text"] == "tok0 tok1 tok2 tok3" and d["output_ids"] == [0, 1, 2, 3]
    assert d["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert d["meta_info"]["cached_tokens"] == 0


def test_unfinished_result_has_null_finish_reason_and_index() -> None:
    item = parse_generate(b'{"text": "a", "bootstrap_room": 1}', 4).items[0]
    r = formats.generate_result(
        item, 2, finished=False, prefill=False, logprob=False, latency=0.0, index=1
    )
    assert r["meta_info"]["finish_reason"] is None and r["index"] == 1
    assert "input_token_logprobs" not in r["meta_info"]


def test_openai_objects() -> None:
    chat = parse_openai("chat", b'{"messages": [{"role": "user", "content": "a b"}]}', 3)
    result = formats.openai_result(chat, "m", 3, 1)
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2",
        "reasoning_content": None,
        "tool_calls": None,
    }
    assert result["usage"]["total_tokens"] == 5
    first = formats.openai_chunk(chat, "m", 1, content="", role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = formats.openai_usage_chunk(chat, "m", 1, 3)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    comp = parse_openai("completion", b'{"prompt": "x"}', 2)
    assert formats.openai_result(comp, "m", 2, 1)["choices"][0]["text"] == "tok0 tok1"
    assert formats.openai_chunk(comp, "m", 1, content=" tok1")["object"] == "text_completion"


def test_error_shapes_and_messages() -> None:
    assert msgspec.json.decode(formats.error_body("generate", "x", 400)) == {
        "error": {"message": "x"}
    }
    openai = msgspec.json.decode(formats.error_body("chat", "x", 500))
    assert openai["object"] == "error" and openai["code"] == 500
    assert "KVPoll.Bootstrapping" in formats.prefill_timeout_message(5, 1.0)
    assert "KVPoll.WaitingForInput" in formats.decode_timeout_message(5, 1.0)
    assert formats.sse({"a": 1}) == b'data: {"a":1}\n\n'


def test_knob_updates_are_validated_as_a_whole() -> None:
    knobs = update_knobs(Knobs(), b'{"fail_next": 2, "fail_status": 503}')
    assert (knobs.fail_next, knobs.fail_status) == (2, 503)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (b'{"jitter": 2}', "jitter"),
        (b'{"fail_status": 99}', "fail_status"),
        (b'{"nope": 1}', "nope"),
        (b'{"pair_timeout": 0}', "pair_timeout"),
        (b"[1]", "JSON object"),
        (b"{", "not valid JSON"),
    ],
)
def test_bad_knob_updates(patch: bytes, message: str) -> None:
    with pytest.raises(KnobsError, match=message):
        update_knobs(Knobs(), patch)
