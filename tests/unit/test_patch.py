from __future__ import annotations

import contextlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilb.errors import BadRequest
from minilb.patch import RequestInfo, encode_fields, inject, inspect

FIELDS = encode_fields("127.0.0.1", 30001, 42)


def strict_loads(data: bytes) -> dict[str, Any]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), keys
        return dict(pairs)

    value: dict[str, Any] = json.loads(data, object_pairs_hook=hook)
    return value


@pytest.mark.parametrize(
    ("body", "generate", "expected"),
    [
        (b'{"text": "hi"}', True, RequestInfo(None, False, False)),
        (b'{"text": "hi", "stream": true}', True, RequestInfo(None, True, False)),
        (b'{"text": ["a", "b"]}', True, RequestInfo(2, False, False)),
        (b'{"input_ids": [1, 2, 3]}', True, RequestInfo(None, False, False)),
        (b'{"input_ids": [[1], [2, 3]]}', True, RequestInfo(2, False, False)),
        (b'{"text": "a", "return_logprob": true}', True, RequestInfo(None, False, True)),
        (b'{"text": ["a", "b"], "return_logprob": [false, true]}', True, RequestInfo(2, False, True)),
        (b'{"text": null, "input_ids": [[1]]}', True, RequestInfo(1, False, False)),
        (b'{"messages": [], "stream": true}', False, RequestInfo(None, True, False)),
        (b'{"text": ["a"], "unknown": {"deep": [1, 2]}}', True, RequestInfo(1, False, False)),
    ],
)
def test_inspect(body: bytes, generate: bool, expected: RequestInfo) -> None:
    assert inspect(body, generate=generate) == expected


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "empty"),
        (b"  ", "empty"),
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"7", "JSON object"),
        (b'{"stream": 1}', "$.stream"),
        (b'{"text": 1}', "`text`"),
        (b'{"text": ["a", 1]}', "`text`"),
        (b'{"text": []}', "empty batch"),
        (b'{"input_ids": "x"}', "`input_ids`"),
        (b'{"input_ids": [[1], 2]}', "mixes"),
        (b'{"text": ["a"], "input_ids": [[1], [2]]}', "different sizes"),
        (b'{"text": ["a", "b"], "return_logprob": [true]}', "`return_logprob`"),
        (b'{"text": "\xff"}', "UTF-8"),
    ],
)
def test_inspect_rejects(body: bytes, words: str) -> None:
    with pytest.raises(BadRequest) as info:
        inspect(body, generate=True)
    assert words in info.value.message
    assert info.value.status == 400


def test_encode_fields_single_and_batch() -> None:
    assert strict_loads(b"{" + encode_fields("h", None, 7) + b"}") == {
        "bootstrap_host": "h", "bootstrap_port": None, "bootstrap_room": 7,
    }
    assert strict_loads(b"{" + encode_fields("[::1]", 9, [1, 2]) + b"}") == {
        "bootstrap_host": ["[::1]", "[::1]"], "bootstrap_port": [9, 9], "bootstrap_room": [1, 2],
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", b'{%s}'),
        (b"{ }", b"{%s}"),
        (b'{"a":1}', b'{%s,"a":1}'),
        (b' \n{ "a" : 1 } ', b'{%s, "a" : 1 } '),
    ],
)
def test_inject_splices_after_the_brace(body: bytes, expected: bytes) -> None:
    assert inject(body, FIELDS) == expected % FIELDS


def test_inject_replaces_client_bootstrap_fields() -> None:
    body = b'{"bootstrap_room": 1, "text": "x", "bootstrap_port": null, "n": 18446744073709551617}'
    out = strict_loads(inject(body, FIELDS))
    assert out == {"bootstrap_host": "127.0.0.1", "bootstrap_port": 30001, "bootstrap_room": 42,
                   "text": "x", "n": 18446744073709551617}


def test_inject_keeps_bootstrap_words_inside_values() -> None:
    body = b'{"text": "say \\"bootstrap_room\\" twice"}'
    assert inject(body, FIELDS) == b"{" + FIELDS + b"," + body[1:]


def test_large_body_is_forwarded_byte_identical() -> None:
    # Formatting a re-serialiser would change: spacing, escapes, float and int spellings.
    tail = (
        b' "text" : "caf\\u00e9 \xe2\x9c\x93 ' + b"x" * 200_000 + b'",\n'
        b'  "sampling_params": {"temperature": 1.0e0, "top_p": 0.90, "max_new_tokens": 16},\n'
        b'  "big": 123456789012345678901234567890, "nested": [[[{"k": [1, 2.50]}]]] }'
    )
    body = b"{" + tail
    info = inspect(body, generate=True)
    assert info == RequestInfo(None, False, False)
    out = inject(body, FIELDS)
    assert out == b"{" + FIELDS + b"," + tail


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6), st.integers(0, 2**63 - 1))
def test_inject_always_gives_one_of_each_key(members: dict[str, Any], room: int) -> None:
    body = msgspec.json.encode(members)
    out = strict_loads(inject(body, encode_fields("127.0.0.1", None, room)))
    expected = {k: v for k, v in members.items() if not k.startswith("bootstrap_")} | {
        k: v for k, v in members.items() if k.startswith("bootstrap_") and k not in
        ("bootstrap_host", "bootstrap_port", "bootstrap_room")
    }
    assert out.pop("bootstrap_room") == room
    assert out.pop("bootstrap_host") == "127.0.0.1"
    assert out.pop("bootstrap_port") is None
    assert out == json.loads(msgspec.json.encode(expected))


@given(st.binary(max_size=64))
def test_inspect_never_raises_anything_but_bad_request(body: bytes) -> None:
    with contextlib.suppress(BadRequest):
        inspect(body, generate=True)
