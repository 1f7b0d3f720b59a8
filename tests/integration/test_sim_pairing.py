"""Pairing between real simulator processes over loopback: success and every mismatch."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.procs import SimProc, free_port, pd_fields, post, post_both, start_sim

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def sims() -> Iterator[tuple[SimProc, SimProc, SimProc]]:
    """Two prefills (the second is "another prefill") and one decode."""
    procs: list[SimProc] = []
    try:
        for role in ("prefill", "prefill", "decode"):
            procs.append(start_sim(role, pair_timeout=TIMEOUT))
        yield procs[0], procs[1], procs[2]
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(autouse=True)
def fresh(sims: tuple[SimProc, SimProc, SimProc]) -> None:
    for proc in sims:
        proc.reset()


def room() -> int:
    return random.randrange(2**63)


def gen(prefill: SimProc, r: int | None, **extra: object) -> dict[str, object]:
    return {
        "text": "a b c",
        "sampling_params": {"max_new_tokens": 3},
        **pd_fields(prefill, r),
        **extra,
    }


def test_paired_request_succeeds_on_both_sides(sims: tuple[SimProc, SimProc, SimProc]) -> None:
    prefill, _, decode = sims
    r = room()
    p, d = post_both(f"{prefill.url}/generate", f"{decode.url}/generate", gen(prefill, r))
    assert p.status_code == 200 and d.status_code == 200
    assert p.json()["text"] == "tok0" and p.json()["meta_info"]["completion_tokens"] == 1
    assert d.json()["text"] == "tok0 tok1 tok2"
    ps, ds = prefill.stats(), decode.stats()
    assert ps["rooms_paired"] == ds["rooms_paired"] == 1
    assert ps["recent_pairs"] == [
        {
            "room": r,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": prefill.bootstrap_port,
            "peer": f"127.0.0.1:{decode.port}",
        }
    ]
    assert ds["recent_pairs"][0]["peer"] == f"127.0.0.1:{prefill.port}"
    assert ps["rooms_timed_out"] == ds["rooms_timed_out"] == 0


def test_decode_first_then_prefill_still_pairs(sims: tuple[SimProc, SimProc, SimProc]) -> None:
    prefill, _, decode = sims
    body = gen(prefill, room())
    with ThreadPoolExecutor(1) as pool:
        d = pool.submit(post, f"{decode.url}/generate", body)
        time.sleep(0.3)
        p = post(f"{prefill.url}/generate", body)
        assert p.status_code == 200 and d.result().status_code == 200


def assert_both_timed_out(p: httpx.Response, d: httpx.Response, elapsed: float) -> None:
    assert p.status_code == 500, p.text
    assert d.status_code == 500, d.text
    assert "KVPoll.Bootstrapping" in p.json()["error"]["message"]
    assert "KVPoll.WaitingForInput" in d.json()["error"]["message"]
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2


def test_mismatches_fail_both_sides_after_the_timeout(
    sims: tuple[SimProc, SimProc, SimProc],
) -> None:
    prefill, other, decode = sims
    # Run the three cases at once so the suite pays the timeout only once.
    r1, r2, r3 = room(), room(), room()
    cases = [
        # other room: the decode asks for a room the prefill never saw
        (gen(prefill, r1), gen(prefill, r1 + 1)),
        # decode pointed at another prefill's bootstrap port
        (gen(prefill, r2), gen(other, r2)),
        # decode pointed at a port where nothing listens (it keeps retrying)
        (gen(prefill, r3), {**gen(prefill, r3), "bootstrap_port": free_port()}),
    ]
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        futures = [
            (
                pool.submit(post, f"{prefill.url}/generate", pb),
                pool.submit(post, f"{decode.url}/generate", db),
            )
            for pb, db in cases
        ]
        results = [(p.result(), d.result()) for p, d in futures]
    elapsed = time.monotonic() - start
    for p, d in results:
        assert_both_timed_out(p, d, elapsed)
    assert prefill.stats()["rooms_timed_out"] == 3
    assert decode.stats()["rooms_timed_out"] == 3
    assert other.stats()["rooms_paired"] == 0


def test_partner_never_sent(sims: tuple[SimProc, SimProc, SimProc]) -> None:
    prefill, _, decode = sims
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        p = pool.submit(post, f"{prefill.url}/generate", gen(prefill, room()))
        d = pool.submit(post, f"{decode.url}/generate", gen(prefill, room()))
        assert_both_timed_out(p.result(), d.result(), time.monotonic() - start)


def test_stream_timeout_is_an_error_event_after_200(
    sims: tuple[SimProc, SimProc, SimProc],
) -> None:
    # SGLang has already sent 200 and its headers when a streamed request fails.
    prefill, _, _ = sims
    p = post(f"{prefill.url}/generate", gen(prefill, room(), stream=True))
    assert p.status_code == 200
    assert "KVPoll.Bootstrapping" in p.text and p.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_missing_room_is_400(sims: tuple[SimProc, SimProc, SimProc], path: str) -> None:
    prefill, _, decode = sims
    body = {
        "text": "a",
        "prompt": "a",
        "messages": [{"role": "user", "content": "a"}],
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
    }
    for proc in (prefill, decode):
        response = post(f"{proc.url}{path}", body)
        assert response.status_code == 400
        assert "requires bootstrap_room" in response.text
    assert prefill.stats()["generate_requests"] == 0


def test_null_bootstrap_port_falls_back_to_the_servers_own(
    sims: tuple[SimProc, SimProc, SimProc],
) -> None:
    prefill, _, _ = sims
    decode = start_sim("decode", pair_timeout=TIMEOUT, bootstrap_port=prefill.bootstrap_port)
    try:
        body = {**gen(prefill, room()), "bootstrap_port": None}
        p, d = post_both(f"{prefill.url}/generate", f"{decode.url}/generate", body)
        assert p.status_code == 200 and d.status_code == 200
        assert decode.stats()["recent_pairs"][0]["bootstrap_port"] is None
    finally:
        decode.stop()


def test_duplicate_room_in_flight(sims: tuple[SimProc, SimProc, SimProc]) -> None:
    prefill, _, decode = sims
    r = room()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, f"{prefill.url}/generate", gen(prefill, r))
        time.sleep(0.2)
        second = post(f"{prefill.url}/generate", gen(prefill, r))
        assert second.status_code == 400 and "duplicate" in second.text
        # The first one is untouched and still pairs with its decode.
        d = post(f"{decode.url}/generate", gen(prefill, r))
        assert d.status_code == 200 and first.result().status_code == 200
    assert prefill.stats()["rooms_duplicated"] == 1
    # Once finished, the room may be used again.
    p, d = post_both(f"{prefill.url}/generate", f"{decode.url}/generate", gen(prefill, r))
    assert p.status_code == d.status_code == 200


def test_second_decode_for_a_room_is_a_duplicate(
    sims: tuple[SimProc, SimProc, SimProc],
) -> None:
    prefill, _, decode = sims
    r = room()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, f"{decode.url}/generate", gen(prefill, r))
        time.sleep(0.2)
        second = post(f"{decode.url}/generate", gen(prefill, r))
        assert second.status_code == 400 and "duplicate" in second.text
        assert post(f"{prefill.url}/generate", gen(prefill, r)).status_code == 200
        assert first.result().status_code == 200
    assert decode.stats()["rooms_duplicated"] == 1


def test_batch_pairs_each_item_by_its_room(sims: tuple[SimProc, SimProc, SimProc]) -> None:
    prefill, _, decode = sims
    rooms = [room(), room()]
    body = {
        "text": ["a", "b c"],
        "sampling_params": {"max_new_tokens": 2},
        "bootstrap_host": ["127.0.0.1"] * 2,
        "bootstrap_port": [prefill.bootstrap_port] * 2,
        "bootstrap_room": rooms,
    }
    p, d = post_both(f"{prefill.url}/generate", f"{decode.url}/generate", body)
    assert p.status_code == d.status_code == 200
    assert [x["text"] for x in d.json()] == ["tok0 tok1"] * 2
    assert sorted(x["room"] for x in decode.stats()["recent_pairs"]) == sorted(rooms)
    assert prefill.stats()["rooms_paired"] == 2 and prefill.stats()["generate_requests"] == 1


def test_client_disconnect_abandons_the_pairing_wait(
    sims: tuple[SimProc, SimProc, SimProc],
) -> None:
    prefill, _, decode = sims
    r = room()
    for proc in (prefill, decode):
        with pytest.raises(httpx.ReadTimeout):
            post(f"{proc.url}/generate", gen(prefill, r), timeout=0.2)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        stats = [prefill.stats(), decode.stats()]
        if all(s["client_disconnects"] == 1 and s["in_flight"] == 0 for s in stats):
            break
        time.sleep(0.02)
    assert [s["client_disconnects"] for s in stats] == [1, 1]
    assert [s["in_flight"] for s in stats] == [0, 0]
    # Abandoned at once: the room is free again (no duplicate, no stale decode).
    p, d = post_both(f"{prefill.url}/generate", f"{decode.url}/generate", gen(prefill, r))
    assert p.status_code == d.status_code == 200
