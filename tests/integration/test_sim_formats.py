"""Wire formats of a real prefill/decode pair, as pd-protocol.md section 3 describes."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.procs import SimProc, pd_fields, post_both, sim_pair, sse_events


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[SimProc, SimProc]]:
    with sim_pair(2.0) as pair:
        yield pair


@pytest.fixture(autouse=True)
def fresh(pd: tuple[SimProc, SimProc]) -> None:
    for proc in pd:
        proc.reset()


def both(
    pd: tuple[SimProc, SimProc], path: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    prefill, decode = pd
    full = {**body, **pd_fields(prefill, random.randrange(2**63))}
    p, d = post_both(f"{prefill.url}{path}", f"{decode.url}{path}", full)
    assert p.status_code == 200, p.text
    assert d.status_code == 200, d.text
    return p, d


def events(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = sse_events(response)
    assert raw[-1] == "[DONE]"
    return [json.loads(e) for e in raw[:-1]]


def test_generate_single(pd: tuple[SimProc, SimProc]) -> None:
    _, d = both(
        pd, "/generate", {"text": "one two three four", "sampling_params": {"max_new_tokens": 3}}
    )
    out = d.json()
    assert out["text"] == "tok0 tok1 tok2" and out["output_ids"] == [0, 1, 2]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (4, 3, 0)
    assert isinstance(meta["id"], str) and meta["e2e_latency"] >= 0


def test_generate_default_max_new_tokens(pd: tuple[SimProc, SimProc]) -> None:
    _, d = both(pd, "/generate", {"input_ids": [1, 2]})
    assert d.json()["meta_info"]["completion_tokens"] == 16
    assert d.json()["meta_info"]["prompt_tokens"] == 2


def test_generate_logprobs(pd: tuple[SimProc, SimProc]) -> None:
    p, d = both(
        pd,
        "/generate",
        {
            "input_ids": [11, 12, 13],
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 2},
        },
    )
    pm, dm = p.json()["meta_info"], d.json()["meta_info"]
    assert [e[1] for e in pm["input_token_logprobs"]] == [11, 12, 13]
    assert all(len(e) == 3 and e[2] is None for e in pm["input_token_logprobs"])
    assert dm["input_token_logprobs"] == []
    assert [e[1] for e in dm["output_token_logprobs"]] == [0, 1]


def test_generate_batch(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    rooms = [random.randrange(2**63) for _ in range(3)]
    body = {
        "text": ["a", "b b", "c c c"],
        "sampling_params": {"max_new_tokens": 2},
        "bootstrap_host": ["127.0.0.1"] * 3,
        "bootstrap_port": [prefill.bootstrap_port] * 3,
        "bootstrap_room": rooms,
    }
    p, d = post_both(f"{prefill.url}/generate", f"{decode.url}/generate", body)
    assert [x["meta_info"]["prompt_tokens"] for x in d.json()] == [1, 2, 3]
    assert [x["text"] for x in p.json()] == ["tok0"] * 3

    p, d = post_both(
        f"{prefill.url}/generate",
        f"{decode.url}/generate",
        {**body, "stream": True, "bootstrap_room": [r + 1 for r in rooms]},
    )
    evs = events(d)
    assert len(evs) == 6 and {e["index"] for e in evs} == {0, 1, 2}
    last = {e["index"]: e for e in evs}
    assert all(e["text"] == "tok0 tok1" and e["meta_info"]["finish_reason"] for e in last.values())
    assert len(events(p)) == 3


def test_generate_stream(pd: tuple[SimProc, SimProc]) -> None:
    p, d = both(
        pd, "/generate", {"text": "x y", "stream": True, "sampling_params": {"max_new_tokens": 3}}
    )
    evs = events(d)
    assert [e["text"] for e in evs] == ["tok0", "tok0 tok1", "tok0 tok1 tok2"]
    assert [e["meta_info"]["completion_tokens"] for e in evs] == [1, 2, 3]
    assert [e["meta_info"]["finish_reason"] for e in evs] == [
        None,
        None,
        {"type": "length", "length": 3},
    ]
    assert "index" not in evs[0]
    [only] = events(p)  # the prefill: exactly one data event, then [DONE]
    assert only["text"] == "tok0" and only["meta_info"]["completion_tokens"] == 1


def test_chat_completions(pd: tuple[SimProc, SimProc]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
    _, d = both(pd, "/v1/chat/completions", body)
    out = d.json()
    assert out["object"] == "chat.completion" and out["model"] == "m"
    assert out["choices"][0]["message"]["content"] == "tok0 tok1"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
        "prompt_tokens_details": None,
    }

    _, d = both(
        pd,
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    evs = events(d)
    assert all(e["object"] == "chat.completion.chunk" for e in evs)
    assert evs[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs if e["choices"])
    assert text == "tok0 tok1"
    assert evs[-2]["choices"][0]["finish_reason"] == "length"
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 2


def test_chat_stream_without_usage(pd: tuple[SimProc, SimProc]) -> None:
    _, d = both(
        pd,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "stream": True},
    )
    assert all(e["choices"] for e in events(d))


def test_completions(pd: tuple[SimProc, SimProc]) -> None:
    _, d = both(pd, "/v1/completions", {"prompt": "a b c", "max_tokens": 3})
    out = d.json()
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "tok0 tok1 tok2"
    assert out["usage"]["prompt_tokens"] == 3

    _, d = both(
        pd,
        "/v1/completions",
        {
            "prompt": "a b c",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    evs = events(d)
    assert "".join(e["choices"][0]["text"] for e in evs if e["choices"]) == "tok0 tok1 tok2"
    assert evs[-2]["choices"][0]["finish_reason"] == "length"
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["total_tokens"] == 6


def test_info_endpoints(pd: tuple[SimProc, SimProc]) -> None:
    prefill, decode = pd
    for proc in pd:
        assert httpx.get(f"{proc.url}/health").status_code == 200
        assert httpx.get(f"{proc.url}/health_generate").status_code == 200
        for path in ("/model_info", "/get_model_info"):
            assert httpx.get(f"{proc.url}{path}").json()["is_generation"] is True
        for path in ("/server_info", "/get_server_info"):
            info = httpx.get(f"{proc.url}{path}").json()
            assert info["disaggregation_mode"] == proc.role
            assert set(info["internal_states"][0]) >= {
                "last_gen_throughput",
                "avg_spec_accept_length",
            }
        models = httpx.get(f"{proc.url}/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["object"] == "model"
        assert httpx.get(f"{proc.url}/flush_cache").status_code == 200
        assert httpx.post(f"{proc.url}/flush_cache").status_code == 200
        assert httpx.post(f"{proc.url}/abort_request", json={"rid": "x"}).status_code == 200
        assert httpx.get(f"{proc.url}/get_load").json()[0]["num_reqs"] == 0
        assert httpx.get(f"{proc.url}/v1/loads").json()["loads"][0]["dp_rank"] == 0
        missing = httpx.get(f"{proc.url}/nope")
        assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    info = httpx.get(f"{prefill.url}/server_info").json()
    assert info["disaggregation_bootstrap_port"] == prefill.bootstrap_port
    assert httpx.get(f"{decode.url}/server_info").json()["disaggregation_bootstrap_port"] == 8998
