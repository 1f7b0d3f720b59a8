"""minilb under uvicorn in front of one simulated prefill and one decode server."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.balancer import make_config, start_balancer
from tests.integration.conftest import PD, wait_until


@pytest.fixture(autouse=True)
def _clean(pd: PD) -> None:
    pd.reset()


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in upstream body: {keys}"
    return dict(pairs)


def upstream_bodies(pd: PD, path: str = "/generate") -> tuple[dict[str, Any], dict[str, Any]]:
    """The last generation body the prefill and the decode received."""
    bodies = []
    for sim in (pd.prefills[0], pd.decodes[0]):
        seen = [r for r in sim.stats()["recent_requests"] if r["path"] == path]
        assert seen, f"{sim.role} saw no request on {path}"
        bodies.append(json.loads(seen[-1]["body"], object_pairs_hook=no_duplicate_keys))
    return bodies[0], bodies[1]


def sse_events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]


def test_generate_is_paired_on_both_servers(pd: PD) -> None:
    r = httpx.post(f"{pd.url}/generate", json={"text": "a b c", "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "tok0 tok1 tok2 tok3"
    assert r.json()["meta_info"]["prompt_tokens"] == 3
    p_body, d_body = upstream_bodies(pd)
    assert p_body == d_body
    assert p_body["bootstrap_host"] == "127.0.0.1"
    assert p_body["bootstrap_port"] == pd.prefills[0].bootstrap_port
    assert 0 <= p_body["bootstrap_room"] < 2**63
    p_stats, d_stats = pd.prefills[0].stats(), pd.decodes[0].stats()
    assert p_stats["generate_requests"] == d_stats["generate_requests"] == 1
    assert p_stats["rooms_paired"] == 1 and d_stats["rooms_paired"] == 1
    assert d_stats["recent_pairs"][-1]["room"] == p_body["bootstrap_room"]


def test_every_request_gets_a_fresh_room(pd: PD) -> None:
    with httpx.Client(base_url=pd.url) as client:
        for _ in range(20):
            assert client.post("/generate", json={"text": "x"}).status_code == 200
    rooms = [p["room"] for p in pd.decodes[0].stats()["recent_pairs"]]
    assert len(rooms) == 20 and len(set(rooms)) == 20


def test_stream_passes_events_through_as_they_arrive(pd: PD) -> None:
    pd.decodes[0].set_knobs(itl=0.3)
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}, "stream": True}
    arrivals: list[float] = []
    chunks: list[str] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{pd.url}/generate", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_text():
            arrivals.append(time.monotonic() - start)
            chunks.append(chunk)
    events = sse_events("".join(chunks))
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert texts == ["tok0", "tok0 tok1", "tok0 tok1 tok2", "tok0 tok1 tok2 tok3"]
    # The decode spaces its events 0.3 s apart: a balancer that buffered the
    # stream would deliver everything in one burst at the end.
    assert len(arrivals) >= 3
    assert arrivals[-1] - arrivals[0] > 0.5


def event_arrivals(url: str, body: dict[str, Any], path: str = "/generate") -> list[tuple[float, str]]:
    """Each SSE event of a stream with the time it was complete at the client."""
    arrivals: list[tuple[float, str]] = []
    buffer = ""
    start = time.monotonic()
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=10) as r:
        assert r.status_code == 200
        for text in r.iter_text():
            buffer += text
            *events, buffer = buffer.split("\n\n")
            arrivals += [(time.monotonic() - start, e.removeprefix("data: ")) for e in events]
    return arrivals


def test_events_close_together_go_out_together_after_the_first_two(pd: PD) -> None:
    lb = start_balancer(make_config(pd.prefills, pd.decodes, stream_coalesce_ms=300))
    try:
        pd.decodes[0].set_knobs(ttft=0.05, itl=0.02)
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 8}, "stream": True}
        arrivals = event_arrivals(lb.url, body)
    finally:
        lb.stop()
    times = [t for t, _ in arrivals]
    assert [json.loads(e)["text"] for _, e in arrivals[:-1]][-1] == " ".join(f"tok{i}" for i in range(8))
    assert arrivals[-1][1] == "[DONE]"
    # The first two events go out as they arrive, 20 ms apart; the 6 behind them
    # (120 ms) and the end wait out the 300 ms window and go out together.
    assert times[1] - times[0] < 0.15
    assert times[2] - times[1] > 0.2
    assert times[-1] - times[2] < 0.1


def test_a_chat_streams_first_token_never_waits_for_the_window(pd: PD) -> None:
    lb = start_balancer(make_config(pd.prefills, pd.decodes, stream_coalesce_ms=300))
    try:
        pd.decodes[0].set_knobs(ttft=0.05, itl=0.01)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "stream": True}
        arrivals = event_arrivals(lb.url, body, "/v1/chat/completions")
    finally:
        lb.stop()
    chunks = [(t, json.loads(e)) for t, e in arrivals if e != "[DONE]"]
    assert chunks[0][1]["choices"][0]["delta"]["role"] == "assistant"
    first_token = next(t for t, c in chunks if c["choices"][0]["delta"].get("content"))
    # The role-only event, then the first token 50 ms later: neither waits; the
    # tokens behind them do, for the 300 ms window.
    assert first_token - arrivals[0][0] < 0.15
    assert arrivals[-1][0] - first_token > 0.2


def test_batch_gets_lists_with_distinct_rooms(pd: PD) -> None:
    r = httpx.post(
        f"{pd.url}/generate",
        json={"text": ["a", "b c", "d e f"], "sampling_params": {"max_new_tokens": 2}},
    )
    assert r.status_code == 200, r.text
    assert [item["meta_info"]["prompt_tokens"] for item in r.json()] == [1, 2, 3]
    p_body, d_body = upstream_bodies(pd)
    assert p_body == d_body
    rooms = d_body["bootstrap_room"]
    assert isinstance(rooms, list) and len(set(rooms)) == 3
    assert d_body["bootstrap_host"] == ["127.0.0.1"] * 3
    assert d_body["bootstrap_port"] == [pd.prefills[0].bootstrap_port] * 3
    assert pd.decodes[0].stats()["rooms_paired"] == 3


def test_batch_stream(pd: PD) -> None:
    body = {"input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 2}, "stream": True}
    r = httpx.post(f"{pd.url}/generate", json=body)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert {json.loads(e)["index"] for e in events[:-1]} == {0, 1}


def test_logprobs_are_merged_from_the_prefill(pd: PD) -> None:
    body = {"text": "a b c", "sampling_params": {"max_new_tokens": 2}, "return_logprob": True}
    r = httpx.post(f"{pd.url}/generate", json=body)
    meta = r.json()["meta_info"]
    assert len(meta["input_token_logprobs"]) == 3
    assert len(meta["output_token_logprobs"]) == 2


def test_logprobs_are_merged_into_every_stream_event(pd: PD) -> None:
    body = {"text": "a b c d", "sampling_params": {"max_new_tokens": 3},
            "return_logprob": True, "stream": True}
    events = sse_events(httpx.post(f"{pd.url}/generate", json=body).text)
    assert events[-1] == "[DONE]"
    metas = [json.loads(e)["meta_info"] for e in events[:-1]]
    assert len(metas) == 3
    assert all(len(m["input_token_logprobs"]) == 4 for m in metas)


def test_client_bootstrap_fields_are_replaced_not_duplicated(pd: PD) -> None:
    raw = b'{"bootstrap_room": 5, "text": "x", "bootstrap_host": "10.9.9.9", "bootstrap_port": 1}'
    r = httpx.post(f"{pd.url}/generate", content=raw)
    assert r.status_code == 200, r.text
    _, d_body = upstream_bodies(pd)  # parsing asserts no key appears twice
    assert d_body["bootstrap_host"] == "127.0.0.1"
    assert d_body["bootstrap_port"] == pd.prefills[0].bootstrap_port
    assert d_body["bootstrap_room"] != 5


def test_other_fields_reach_the_servers_byte_for_byte(pd: PD) -> None:
    raw = (
        b'{ "text" : "caf\\u00e9 \xe2\x9c\x93", "sampling_params":{"max_new_tokens":1,'
        b'"temperature":1.0e0}, "custom": [18446744073709551617, 1.50, {"z":1,"a":2}] }'
    )
    assert httpx.post(f"{pd.url}/generate", content=raw).status_code == 200
    for sim in (pd.prefills[0], pd.decodes[0]):
        seen = sim.last_request()["body"].encode()
        assert seen.endswith(raw[1:]), seen


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_openai_routes(pd: PD, path: str) -> None:
    if path == "/v1/chat/completions":
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi you"}]}
    else:
        body = {"model": "m", "prompt": "hi you"}
    r = httpx.post(f"{pd.url}{path}", json={**body, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    p_body, d_body = upstream_bodies(pd, path)
    assert p_body["bootstrap_room"] == d_body["bootstrap_room"]
    events = sse_events(
        httpx.post(
            f"{pd.url}{path}",
            json={**body, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}},
        ).text
    )
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"] == []  # the usage chunk


def test_openai_sdk(pd: PD) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{pd.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert chat.choices[0].message.content == "tok0 tok1 tok2"
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=3, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok0 tok1 tok2"
    completion = client.completions.create(model="m", prompt="hello", max_tokens=2)
    assert completion.choices[0].text == "tok0 tok1"
    client.close()


# errors


def assert_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status
    assert isinstance(error["type"], str) and error["type"]
    assert words in error["message"], error["message"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{bad", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b'{"text": "x", "stream": "yes"}', "$.stream"),
        (b'{"text": 5}', "`text`"),
        (b'{"text": []}', "empty batch"),
        (b'{"input_ids": [[1], 2]}', "`input_ids`"),
        (b'{"text": "x"}\xff', "UTF-8"),
    ],
)
def test_bad_bodies_get_400(pd: PD, content: bytes, words: str) -> None:
    assert_error(httpx.post(f"{pd.url}/generate", content=content), 400, words)
    assert pd.decodes[0].stats()["generate_requests"] == 0


def test_openai_route_rejects_non_objects(pd: PD) -> None:
    assert_error(httpx.post(f"{pd.url}/v1/chat/completions", content=b"[]"), 400, "JSON object")


def test_body_over_the_limit_gets_413(pd: PD) -> None:
    big = b'{"text": "' + b"x" * (2 << 20) + b'"}'
    assert_error(httpx.post(f"{pd.url}/generate", content=big), 413, "limit")


def test_unknown_route_404_and_wrong_method_405(pd: PD) -> None:
    assert_error(httpx.get(f"{pd.url}/nowhere"), 404, "/nowhere")
    r = httpx.get(f"{pd.url}/generate")
    assert_error(r, 405, "POST")
    assert r.headers["allow"] == "POST"


def test_decode_4xx_is_passed_on_and_prefill_cancelled(pd: PD) -> None:
    pd.decodes[0].set_knobs(fail_next=1, fail_status=400)
    r = httpx.post(f"{pd.url}/generate", json={"text": "x"})
    assert_error(r, 400, "decode server")
    prefill = pd.prefills[0]
    assert wait_until(lambda: prefill.stats()["in_flight"] == 0, 1.0)
    assert prefill.stats()["client_disconnects"] == 1


def test_decode_5xx_gives_502_without_waiting_for_the_pair_timeout(pd: PD) -> None:
    pd.decodes[0].set_knobs(fail_next=1, fail_status=500)
    start = time.monotonic()
    r = httpx.post(f"{pd.url}/generate", json={"text": "x"})
    assert_error(r, 502, "decode server")
    assert time.monotonic() - start < 2.0  # the pair timeout is 5 s
    assert wait_until(lambda: pd.prefills[0].stats()["in_flight"] == 0, 1.0)


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_failure_cancels_the_decode_at_once(pd: PD, stream: bool) -> None:
    pd.prefills[0].set_knobs(fail_next=1, fail_status=503)
    start = time.monotonic()
    r = httpx.post(f"{pd.url}/generate", json={"text": "x", "stream": stream})
    assert_error(r, 502, "prefill server")
    assert time.monotonic() - start < 2.0
    decode = pd.decodes[0]
    assert wait_until(lambda: decode.stats()["in_flight"] == 0, 1.0)
    assert decode.stats()["client_disconnects"] == 1


def test_prefill_4xx_status_is_kept(pd: PD) -> None:
    pd.prefills[0].set_knobs(fail_next=1, fail_status=422)
    assert_error(httpx.post(f"{pd.url}/generate", json={"text": "x"}), 422, "prefill server")


def test_failure_after_stream_started_ends_with_error_event(pd: PD) -> None:
    pd.decodes[0].set_knobs(reset_after_events=2)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 10}, "stream": True}
    r = httpx.post(f"{pd.url}/generate", json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert len(events) == 4, events
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 502


def test_client_disconnect_closes_both_upstream_requests(pd: PD) -> None:
    for sim in pd.sims:
        sim.set_knobs(itl=0.05)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1000}, "stream": True}
    with httpx.stream("POST", f"{pd.url}/generate", json=body, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    decode = pd.decodes[0]
    assert wait_until(lambda: decode.stats()["in_flight"] == 0, 1.0)
    assert decode.stats()["client_disconnects"] == 1
    assert decode.stats()["events_sent"] < 100


def test_client_disconnect_during_non_stream_request(pd: PD) -> None:
    pd.decodes[0].set_knobs(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{pd.url}/generate", json={"text": "x"}, timeout=0.5)
    for sim in pd.sims:
        assert wait_until(lambda s=sim: s.stats()["in_flight"] == 0, 1.0), sim.role  # type: ignore[misc]
    assert pd.decodes[0].stats()["client_disconnects"] == 1


# control plane


def test_health(pd: PD) -> None:
    r = httpx.get(f"{pd.url}/health")
    assert r.status_code == 200


def test_health_generate_and_flush_cache_report_every_server(pd: PD) -> None:
    r = httpx.get(f"{pd.url}/health_generate")
    assert r.status_code == 200
    assert {s["role"] for s in r.json()["servers"]} == {"prefill", "decode"}
    assert httpx.post(f"{pd.url}/flush_cache").status_code == 200
    assert pd.decodes[0].stats()["requests"]["/flush_cache"] == 1
    pd.decodes[0].set_knobs(health_fail=True)
    r = httpx.get(f"{pd.url}/health_generate")
    assert r.status_code == 503
    failed = [s for s in r.json()["servers"] if s["status"] != 200]
    assert [s["url"] for s in failed] == [pd.decodes[0].url]
    assert pd.decodes[0].url in r.json()["error"]["message"]


def test_server_info_has_mini_lb_shape(pd: PD) -> None:
    for path in ("/get_server_info", "/server_info"):
        info = httpx.get(f"{pd.url}{path}").json()
        assert [p["disaggregation_mode"] for p in info["prefill"]] == ["prefill"]
        assert [d["disaggregation_mode"] for d in info["decode"]] == ["decode"]
        assert isinstance(info["internal_states"], list) and info["internal_states"]


def test_model_info_and_models(pd: PD) -> None:
    for path in ("/get_model_info", "/model_info"):
        assert httpx.get(f"{pd.url}{path}").json()["model_path"]
    models = httpx.get(f"{pd.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
