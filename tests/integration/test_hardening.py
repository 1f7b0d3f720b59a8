"""Hardening: hostile bodies against a live balancer, a client that stops reading, and faults
injected by killing servers and flapping their health.

Every answer is a 200 for a valid request or a clear 4xx in the OpenAI error shape, never a
5xx; the balancer stays up; in-flight counts return to 0 and no file descriptors leak.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.balancer import Balancer, make_config, start_balancer
from tests.integration.conftest import KNOBS_OFF, PD, start_sims, wait_until
from tests.procs import SimProc, free_port, start_sim

LIMIT = 1 << 20  # the `pd` fixture's max_body_bytes
PROPERTY = settings(max_examples=150, deadline=None, database=None)
FEW = settings(max_examples=60, deadline=None, database=None)
SMALL = {"max_new_tokens": 2}


# -- helpers --------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys upstream: {keys}"
    return dict(pairs)


def upstream_body(sim: SimProc) -> dict[str, Any]:
    """The last generation body a simulator saw, parsed strictly (a repeated key fails)."""
    body: dict[str, Any] = json.loads(sim.last_request()["body"],
                                      object_pairs_hook=no_duplicate_keys)
    return body


def assert_error_shape(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == r.status_code
    return error  # type: ignore[no-any-return]


def sse_data(text: str) -> list[str]:
    return [b[len("data: "):] for b in text.split("\n\n") if b.startswith("data: ")]


def assert_alive(lb: Balancer) -> None:
    assert lb.popen.poll() is None, lb.output()[-2000:]
    assert httpx.get(f"{lb.url}/health", timeout=5).status_code == 200
    r = httpx.post(f"{lb.url}/generate", json={"text": "still here", "sampling_params": SMALL}, timeout=10)
    assert r.status_code == 200, r.text


def retry_lines(lb: Balancer) -> int:
    return lb.output().count("retrying on another pair")


# -- the HTTP surface, property-based --------------------------------------------------------


@pytest.fixture(scope="module")
def client(pd: PD) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pd.url, timeout=15) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def _still_alive_at_the_end(pd: PD) -> Iterator[None]:
    yield
    assert pd.lb.popen.poll() is None, pd.lb.output()[-2000:]
    for sim in pd.sims:
        assert wait_until(lambda s=sim: s.stats()["in_flight"] == 0, 3.0), sim.role  # type: ignore[misc]


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# Literals json.dumps cannot write: out-of-range numbers, overlong integers, odd spellings.
weird_numbers = st.sampled_from([
    "1e999", "-1e999", "1E-400", "-0", "0.0e0", str(10**400), "-" + str(10**400),
    "123456789012345678901234567890", "1.5e308", "-2.2250738585072014e-308",
])
text_values = st.one_of(
    st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3),  # the valid shapes
    st.none(), st.booleans(), st.integers(), st.dictionaries(st.text(max_size=3), json_scalars, max_size=2),
    st.lists(json_scalars, min_size=1, max_size=3), st.lists(st.lists(st.text(max_size=3), max_size=2),
                                                             min_size=1, max_size=2),
)
token_ids = st.integers(0, 5000)
ids_values = st.one_of(
    st.lists(token_ids, max_size=5), st.lists(st.lists(token_ids, max_size=4), max_size=3),  # valid
    st.none(), st.text(max_size=5), st.integers(), st.lists(st.one_of(token_ids, st.lists(token_ids)),
                                                            min_size=2, max_size=4),
    st.lists(st.text(max_size=3), min_size=1, max_size=3),
)
bool_values = st.one_of(st.booleans(), st.none(), st.integers(-2, 2), st.text(max_size=4),
                        st.lists(st.booleans(), max_size=3), st.floats(allow_nan=False))
bootstrap_values = st.fixed_dictionaries({}, optional={
    "bootstrap_host": json_values, "bootstrap_port": json_values, "bootstrap_room": json_values,
})


def is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and len(value) > 0
                                      and all(isinstance(v, str) for v in value))


def is_ids(value: Any) -> bool:
    def flat(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)

    return flat(value) or (isinstance(value, list) and len(value) > 0 and all(flat(v) for v in value))


def batch_size(body: dict[str, Any]) -> int | None:
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None:
        return len(text) if isinstance(text, list) else None
    if isinstance(ids, list) and ids and all(isinstance(v, list) for v in ids):
        return len(ids)
    return None


def expected_statuses(body: dict[str, Any]) -> set[int]:
    """200 for a request SGLang serves, 400 for one minilb (README's table) must refuse,
    either for the rest (the server decides, with a 4xx)."""
    text, ids = body.get("text"), body.get("input_ids")
    stream, logprob = body.get("stream", False), body.get("return_logprob")
    refused = (
        ("stream" in body and not isinstance(stream, bool))
        or not (logprob is None or isinstance(logprob, bool)
                or (isinstance(logprob, list) and all(isinstance(v, bool) for v in logprob)))
        or (text is not None and not is_text(text))
        or (ids is not None and not isinstance(ids, list))
        or (isinstance(ids, list) and len({isinstance(v, list) for v in ids}) > 1)
    )
    if refused:
        return {400}
    size = batch_size(body)
    if isinstance(logprob, list) and size is not None and len(logprob) != size:
        return {400}
    if "text" in body and "input_ids" in body:
        return {200, 400}
    if (is_text(text) and "input_ids" not in body) or (is_ids(ids) and "text" not in body):
        if isinstance(logprob, list) and size is None:
            return {200, 400}
        return {200}
    return {400} if text is None and ids is None else {200, 400}


@st.composite
def generate_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {}
    which = draw(st.sampled_from(["text", "input_ids", "both", "neither"]))
    if which in ("text", "both"):
        body["text"] = draw(text_values)
    if which in ("input_ids", "both"):
        body["input_ids"] = draw(ids_values)
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans() | bool_values)
    if draw(st.booleans()):
        body["return_logprob"] = draw(bool_values)
    body.update(draw(bootstrap_values))
    body["sampling_params"] = SMALL
    if draw(st.booleans()):
        body["x_" + draw(st.text(max_size=6))] = draw(json_values)
    return body


def check_answer(r: httpx.Response, body: dict[str, Any], expected: set[int]) -> None:
    assert r.status_code in expected, f"{body!r} -> {r.status_code} {r.text[:300]}"
    if r.status_code != 200:
        assert_error_shape(r)
        return
    if body.get("stream") is True:
        events = sse_data(r.text)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), r.text[-300:]
    else:
        answer = r.json()
        size = batch_size(body)
        if size is not None:
            assert isinstance(answer, list) and len(answer) == size
        else:
            assert isinstance(answer, dict) and "text" in answer


@PROPERTY
@given(body=generate_bodies())
def test_generate_bodies_get_200_or_a_clear_400(pd: PD, client: httpx.Client, body: dict[str, Any]) -> None:
    r = client.post("/generate", content=json.dumps(body).encode())
    check_answer(r, body, expected_statuses(body))
    if r.status_code == 200:
        # The balancer's bootstrap fields replaced the client's; no key went up twice.
        seen = upstream_body(pd.decodes[0])
        host = seen["bootstrap_host"]
        size = len(host) if isinstance(host, list) else None
        assert host == ("127.0.0.1" if size is None else ["127.0.0.1"] * size)
        port = pd.prefills[0].bootstrap_port
        assert seen["bootstrap_port"] == (port if size is None else [port] * size)
        rooms = seen["bootstrap_room"] if size is not None else [seen["bootstrap_room"]]
        assert all(isinstance(room, int) and 0 <= room < 2**63 for room in rooms)
        assert len(set(rooms)) == len(rooms)
        if "bootstrap_room" in body:
            assert seen["bootstrap_room"] != body["bootstrap_room"]


@PROPERTY
@given(value=json_values.filter(lambda v: not isinstance(v, dict)), path=st.sampled_from(
    ["/generate", "/v1/chat/completions", "/v1/completions"]))
def test_json_that_is_not_an_object_gets_400(client: httpx.Client, value: Any, path: str) -> None:
    r = client.post(path, content=json.dumps(value).encode())
    error = assert_error_shape(r, 400)
    assert "JSON object" in error["message"]


@PROPERTY
@given(raw=st.binary(max_size=200) | st.text(max_size=60).map(str.encode),
       path=st.sampled_from(["/generate", "/v1/chat/completions"]))
def test_arbitrary_bytes_never_get_a_5xx(client: httpx.Client, raw: bytes, path: str) -> None:
    r = client.post(path, content=raw)
    assert r.status_code in (200, 400), f"{raw!r} -> {r.status_code} {r.text[:200]}"
    if r.status_code == 400:
        assert_error_shape(r)


@PROPERTY
@given(number=weird_numbers, key=st.sampled_from(["extra", "stream", "return_logprob", "text",
                                                  "input_ids", "bootstrap_room", "sampling_params"]))
def test_huge_and_odd_numbers(client: httpx.Client, number: str, key: str) -> None:
    prompt = "" if key in ("text", "input_ids") else '"text": "a", '
    raw = f'{{{prompt}"{key}": {number}}}'.encode()
    r = client.post("/generate", content=raw)
    if key in ("extra", "bootstrap_room"):
        assert r.status_code == 200, f"{raw!r} -> {r.status_code} {r.text[:200]}"
    else:
        assert_error_shape(r, 400)


@FEW
@given(junk=st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)), where=st.sampled_from(
    ["value", "key", "extra"]), path=st.sampled_from(["/generate", "/v1/completions"]))
def test_invalid_utf8_gets_400(client: httpx.Client, junk: bytes, where: str, path: str) -> None:
    raw = {
        "value": b'{"text": "a' + junk + b'", "prompt": "p"}',
        "key": b'{"k' + junk + b'": 1, "text": "a", "prompt": "p"}',
        "extra": b'{"text": "a", "prompt": "p", "x": ["' + junk + b'"]}',
    }[where]
    error = assert_error_shape(client.post(path, content=raw), 400)
    assert "UTF-8" in error["message"]


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@FEW
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), stream=st.booleans())
def test_chunked_bodies_reach_the_servers_intact(pd: PD, client: httpx.Client, sizes: list[int],
                                                 stream: bool) -> None:
    raw = json.dumps({"text": "chunked é ✓", "stream": stream, "sampling_params": SMALL,
                      "padding": "x" * sum(sizes)}).encode()

    def chunks() -> Iterator[bytes]:
        at = 0
        for size in sizes:
            yield raw[at:at + size]
            at += size
        yield raw[at:]

    r = client.post("/generate", content=chunks())
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 200, r.text[:300]
    seen = pd.decodes[0].last_request()["body"].encode()
    assert seen.endswith(raw[1:])  # every byte after the opening brace, as sent


@FEW
@given(content_type=st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "", "*/*",
                                     "application/json; charset=latin-1", "multipart/form-data"])
       | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip))
def test_any_content_type_is_parsed_as_json(client: httpx.Client, content_type: str) -> None:
    r = client.post("/generate", content=b'{"text": "ct", "sampling_params": {"max_new_tokens": 1}}',
                    headers={"content-type": content_type})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["text"] == "tok0"


@FEW
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.sampled_from(["/generate", "/v1/chat/completions", "/v1/completions"])
       | st.text(st.characters(min_codepoint=97, max_codepoint=122), max_size=12).map(lambda s: "/x" + s))
def test_unknown_routes_and_wrong_methods(client: httpx.Client, method: str, path: str) -> None:
    r = client.request(method, path, content=b'{"text": "a"}')
    error = assert_error_shape(r)
    assert r.status_code in (404, 405)
    if r.status_code == 405:
        assert r.headers["allow"] == "POST" and method in error["message"]


# -- the HTTP surface, the cases named in the issue ------------------------------------------


def nested(depth: int, open_: str = "[", close: str = "]", inner: str = "") -> str:
    return open_ * depth + inner + close * depth


DEEP = 10_000


@pytest.mark.parametrize("raw", [
    pytest.param(nested(DEEP), id="top-level-list"),
    pytest.param('{"text": "a", "x": ' + nested(DEEP) + "}", id="unread-field"),
    pytest.param('{"text": ' + nested(DEEP) + "}", id="text"),
    pytest.param('{"input_ids": ' + nested(DEEP) + "}", id="input_ids"),
    pytest.param('{"text": "a", "x": ' + nested(DEEP, '{"a":', "}", "1") + "}", id="objects"),
    pytest.param('{"text": "a", "bootstrap_room": ' + nested(DEEP) + "}", id="bootstrap_room"),
    pytest.param('{"text": "a", "x": ' + nested(1_000) + "}", id="depth-1000"),
])
@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_deep_nesting_gets_400(client: httpx.Client, raw: str, path: str) -> None:
    r = client.post(path, content=raw.encode())
    assert r.status_code != 500, "deep nesting made minilb answer 500 (RecursionError in patch.inspect)"
    assert_error_shape(r, 400)


@pytest.mark.parametrize("preset", [
    {"bootstrap_host": "10.9.9.9", "bootstrap_port": 1, "bootstrap_room": 7},
    {"bootstrap_room": None},
    {"bootstrap_host": ["a", "b"], "bootstrap_room": [1, 1]},
    {"bootstrap_port": {"nested": [1, 2]}},
])
@pytest.mark.parametrize("text", ["one", ["one", "two", "three"]])
def test_preset_bootstrap_fields_are_replaced(pd: PD, client: httpx.Client, preset: dict[str, Any],
                                              text: str | list[str]) -> None:
    r = client.post("/generate", content=json.dumps({"text": text, **preset, "sampling_params": SMALL}))
    assert r.status_code == 200, r.text
    seen = upstream_body(pd.decodes[0])
    n = len(text) if isinstance(text, list) else None
    assert seen["bootstrap_host"] == ("127.0.0.1" if n is None else ["127.0.0.1"] * n)
    port = pd.prefills[0].bootstrap_port
    assert seen["bootstrap_port"] == (port if n is None else [port] * n)
    assert seen["bootstrap_room"] != preset.get("bootstrap_room", -1)


@pytest.mark.parametrize("key", ["bootstrap\\u005froom", "\\u0062ootstrap_room", "bootstrap_r\\u006fom"])
def test_preset_bootstrap_key_spelt_with_escapes_is_replaced(pd: PD, client: httpx.Client, key: str) -> None:
    # JSON-equal to "bootstrap_room": a server that parses the body sees the key twice,
    # and Python's json keeps the last one, the client's room.
    raw = '{"text": "a", "' + key + '": 5, "sampling_params": {"max_new_tokens": 1}}'
    r = client.post("/generate", content=raw.encode())
    assert r.status_code == 200, r.text
    seen = upstream_body(pd.decodes[0])
    assert seen["bootstrap_room"] != 5


@pytest.mark.parametrize("body", [b"", b"   \n", b"\r\n\t"])
@pytest.mark.parametrize("chunked", [False, True])
def test_empty_bodies_get_400(client: httpx.Client, body: bytes, chunked: bool) -> None:
    content: bytes | Iterator[bytes] = iter([body]) if chunked else body
    error = assert_error_shape(client.post("/generate", content=content), 400)
    assert "empty" in error["message"]


def _body_of(size: int) -> bytes:
    head, tail = b'{"text": "big", "sampling_params": {"max_new_tokens": 1}, "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit(pd: PD, client: httpx.Client, chunked: bool) -> None:
    def send(raw: bytes) -> httpx.Response:
        if not chunked:
            return client.post("/generate", content=raw)
        return client.post("/generate", content=(raw[i:i + 65536] for i in range(0, len(raw), 65536)))

    assert send(_body_of(LIMIT)).status_code == 200
    r = send(_body_of(LIMIT + 1))
    assert_error_shape(r, 413)
    assert str(LIMIT) in r.json()["error"]["message"]
    assert_alive(pd.lb)


def test_content_length_over_the_limit_is_refused_before_the_body_is_read(pd: PD) -> None:
    # Announce a body over the limit and send none of it: the answer must not wait for it.
    with socket.create_connection(("127.0.0.1", pd.lb.port), timeout=5) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_the_balancer_survived_the_hostile_bodies(pd: PD) -> None:
    assert_alive(pd.lb)
    assert "Traceback" not in pd.lb.output(), pd.lb.output()[-3000:]


# -- a client that stops reading -------------------------------------------------------------


def test_a_slow_client_makes_the_decode_wait_not_minilb_buffer(pd: PD) -> None:
    decode, lb = pd.decodes[0], pd.lb
    pd.reset()
    tokens = 3000
    raw = json.dumps({"text": "slow", "stream": True, "sampling_params": {"max_new_tokens": tokens}}).encode()
    rss_before = rss_kib(lb.popen.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connect, to cap the window
    sock.settimeout(20)
    try:
        sock.connect(("127.0.0.1", lb.port))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]

        # The client reads nothing more: the decode must stall once the buffers are full.
        def sent() -> int:
            return int(decode.stats()["bytes_sent"])

        last, still = -1, 0
        deadline = time.monotonic() + 15
        while still < 3 and time.monotonic() < deadline:
            time.sleep(0.25)
            now = sent()
            still = still + 1 if now == last else 0
            last = now
        stalled_at = last
        assert still >= 3, f"decode never stalled; bytes_sent {last}"
        assert decode.stats()["in_flight"] == 1
        growth = rss_kib(lb.popen.pid) - rss_before

        # Now read the rest: the stream completes.
        received = bytearray(data)
        while chunk := sock.recv(1 << 20):
            received += chunk
    finally:
        sock.close()
    total = sent()
    assert total > 20_000_000, f"the stream was only {total} bytes"
    # What the decode got out is what the kernel's socket buffers took (they autotune up to
    # tcp_rmem/tcp_wmem's maximum: 8 to 30 MB seen here), not what minilb read and kept: its
    # own buffer is capped at 256 KiB, and its RSS tells the rest.
    kernel = sum(int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
                 for name in ("tcp_rmem", "tcp_wmem", "tcp_wmem"))
    assert stalled_at < kernel + (1 << 20), f"decode sent {stalled_at} of {total} bytes to a silent client"
    assert growth < 16 * 1024, f"minilb's RSS grew by {growth} KiB holding a stream of {total} bytes"
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), received[-200:]
    assert decode.stats()["events_sent"] == tokens + 1
    assert wait_until(lambda: decode.stats()["in_flight"] == 0, 3.0)


# -- fault injection: kills, a server down at start, flapping health ------------------------


def test_decode_killed_mid_stream_ends_with_an_error_event(pd: PD) -> None:
    prefill, live = pd.prefills[0], pd.decodes[0]
    pd.reset()
    victim = start_sim("decode")
    # Health every 2 s: right after the kill the dead decode is still in the rotation,
    # so the requests that follow show the retries.
    lb = start_balancer(make_config([prefill], [victim, live], health_check_interval_secs=2.0,
                                    health_failure_threshold=1))
    try:
        with httpx.Client(base_url=lb.url, timeout=10) as c:
            for _ in range(4):
                assert c.post("/generate", json={"text": "warm", "sampling_params": SMALL}).status_code == 200
        fds_before = open_fds(lb.popen.pid)
        victim.set_knobs(itl=0.05)
        body = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 200}}
        events: list[str] = []
        start = time.monotonic()
        with httpx.Client(timeout=10) as c:
            for _ in range(2):  # round robin: the first or the second stream lands on the victim
                with c.stream("POST", f"{lb.url}/generate", json=body) as r:
                    assert r.status_code == 200
                    lines = r.iter_lines()
                    first = next(line for line in lines if line.startswith("data: "))
                    if victim.stats()["in_flight"] == 0:
                        continue  # this one is on the live decode; let it go
                    events.append(first[6:])
                    os.kill(victim.popen.pid, signal.SIGKILL)
                    events += [line[6:] for line in lines if line.startswith("data: ")]
                    break
        victim.popen.wait(5)
        assert events, "no stream reached the victim"
        assert time.monotonic() - start < 8
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == 502 and victim.url in error["message"], error
        assert 1 <= len(events) - 2 < 200
        assert wait_until(lambda: prefill.stats()["in_flight"] == 0, 2.0)

        # The dead decode is still in the rotation until the next probe: retries hide it.
        retries_before = retry_lines(lb)
        with httpx.Client(base_url=lb.url, timeout=10) as c:
            body = {"text": "after", "sampling_params": SMALL}
            answers = [c.post("/generate", json=body) for _ in range(4)]
            healthy = {w["url"]: w["healthy"] for w in c.get("/workers").json()["workers"]}
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        if healthy[victim.url]:  # (unless the prober ran in the few ms since the kill)
            assert retry_lines(lb) > retries_before, lb.output()[-2000:]
        assert wait_until(lambda: prefill.stats()["in_flight"] == 0 and live.stats()["in_flight"] == 0, 2.0)
        assert wait_until(lambda: open_fds(lb.popen.pid) <= fds_before + 4, 6.0), (
            f"fds {fds_before} -> {open_fds(lb.popen.pid)}")
    finally:
        lb.stop()
        victim.stop()


def test_decode_down_at_start_leaves_the_rotation(pd: PD) -> None:
    prefill, live = pd.prefills[0], pd.decodes[0]
    pd.reset()
    dead = SimProc("decode", free_port(), None, popen=None)  # type: ignore[arg-type]
    lb = start_balancer(make_config([prefill], [dead, live], health_check_interval_secs=0.2,
                                    health_failure_threshold=1))
    try:
        with httpx.Client(base_url=lb.url, timeout=10) as c:
            answers = [c.post("/generate", json={"text": "a", "stream": i % 2 == 1, "sampling_params": SMALL})
                       for i in range(8)]
            assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]

            def dead_is_unhealthy() -> bool:
                workers = {w["url"]: w for w in c.get("/workers").json()["workers"]}
                return workers[dead.url]["healthy"] is False and workers[live.url]["healthy"] is True

            assert wait_until(dead_is_unhealthy, 2.0)
            fds_before = open_fds(lb.popen.pid)
            retries = retry_lines(lb)
            answers = [c.post("/generate", json={"text": "b", "stream": i % 2 == 1, "sampling_params": SMALL})
                       for i in range(20)]
            assert [r.status_code for r in answers] == [200] * 20
            assert retry_lines(lb) == retries, "attempts still go to the dead decode"
            assert c.get("/readiness").status_code == 200
        assert live.stats()["requests"]["/generate"] == 28
        assert wait_until(lambda: prefill.stats()["in_flight"] == 0 and live.stats()["in_flight"] == 0, 2.0)
        assert open_fds(lb.popen.pid) <= fds_before + 4
    finally:
        lb.stop()


def test_a_hung_prefill_does_not_hold_a_finished_stream() -> None:
    # The prefill hangs, so the decode's pairing times out (1 s) and, as SGLang does once a
    # stream has started, it sends an error event and [DONE]. The client's stream must end
    # there, with one [DONE], not wait out minilb's timeout for the prefill and add another.
    sims = start_sims(1, 1, pair_timeout=1.0)
    lb = start_balancer(make_config(sims[:1], sims[1:], timeout_secs=4.0, max_attempts=1))
    try:
        sims[0].set_knobs(hang=True)
        start = time.monotonic()
        r = httpx.post(f"{lb.url}/generate", json={"text": "x", "stream": True, "sampling_params": SMALL},
                       timeout=10)
        elapsed = time.monotonic() - start
        events = sse_data(r.text)
        assert r.status_code == 200
        assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events
        assert "KVPoll.WaitingForInput" in json.loads(events[-2])["error"]["message"]
        assert elapsed < 3.0, f"the stream ended {elapsed:.1f} s in, not at the decode's [DONE]"
        assert wait_until(lambda: sims[0].stats()["in_flight"] == 0, 2.0)
    finally:
        lb.stop()
        for sim in sims:
            sim.stop()


@pytest.fixture(scope="module")
def more_sims() -> Iterator[list[SimProc]]:
    sims = start_sims(1, 1)
    yield sims
    for sim in sims:
        sim.stop()


async def _load(url: str, total: int, concurrency: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    queue = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in queue:
            body: dict[str, Any] = {"text": f"flap {i}", "stream": i % 3 == 0,
                                    "sampling_params": {"max_new_tokens": 1 + i % 5}}
            if i % 7 == 0:
                body["text"] = [body["text"], "two"]
            try:
                r = await client.post(f"{url}/generate", json=body)
                ok = r.status_code == 200 and (not body["stream"] or (
                    r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text))
                outcomes["ok" if ok else f"status {r.status_code}: {r.text[:100]}"] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1

    async with httpx.AsyncClient(timeout=15) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), 60)
    return outcomes


@pytest.mark.gunicorn
def test_health_flapping_under_gunicorn_loses_nothing(pd: PD, more_sims: list[SimProc]) -> None:
    pd.reset()
    prefills = [pd.prefills[0], more_sims[0]]
    decodes = [pd.decodes[0], more_sims[1]]
    for sim in more_sims:
        sim.set_knobs(**KNOBS_OFF)
        sim.reset()
    config = make_config(prefills, decodes, health_check_interval_secs=0.1, health_failure_threshold=1,
                         health_success_threshold=1)
    lb = start_balancer(config, mode="gunicorn", workers=2)
    stop = threading.Event()
    flips = 0

    def flap() -> None:
        nonlocal flips
        failing = False
        rng = random.Random(5)
        while not stop.is_set():
            failing = not failing
            decodes[1].set_knobs(health_fail=failing)
            flips += 1
            stop.wait(rng.uniform(0.1, 0.3))
        decodes[1].set_knobs(health_fail=False)

    try:
        workers = lb.workers()
        assert len(workers) == 2
        assert asyncio.run(_load(lb.url, 64, 16)) == {"ok": 64}  # fill the pools
        fds_before = {pid: open_fds(pid) for pid in workers}
        for sim in decodes:  # requests of 50-130 ms: the load spans several flips
            sim.set_knobs(ttft=0.05, itl=0.02)
        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        try:
            outcomes = asyncio.run(_load(lb.url, 200, 16))
        finally:
            stop.set()
            flapper.join(5)
            for sim in decodes:
                sim.set_knobs(**KNOBS_OFF)
        assert set(outcomes) == {"ok"}, outcomes
        assert flips >= 4
        assert "UNHEALTHY" in lb.output()
        for sim in prefills + decodes:
            assert wait_until(lambda s=sim: s.stats()["in_flight"] == 0, 3.0), sim.url  # type: ignore[misc]
        assert lb.workers() == workers, "a worker died"
        for pid, before in fds_before.items():
            assert wait_until(lambda p=pid, b=before: open_fds(p) <= b + 4, 6.0), (  # type: ignore[misc]
                f"worker {pid}: fds {before} -> {open_fds(pid)}")
    finally:
        stop.set()
        lb.stop()
