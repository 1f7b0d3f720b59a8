"""Parsing generation requests (minilb.sim.requests): pure, no sockets."""

from __future__ import annotations

import msgspec
import pytest

from minilb.sim.requests import RequestError, parse_generate, parse_openai


def body(**fields: object) -> bytes:
    return msgspec.json.encode(fields)


def test_single_text_counts_words_and_reads_bootstrap() -> None:
    req = parse_generate(
        body(
            text="a b c",
            sampling_params={"max_new_tokens": 4},
            bootstrap_host="h",
            bootstrap_port=9,
            bootstrap_room=7,
            stream=True,
            return_logprob=True,
        ),
        16,
    )
    assert not req.batch and req.stream and req.return_logprob
    [item] = req.items
    assert (item.prompt_tokens, item.max_new_tokens) == (3, 4)
    assert (item.host, item.port, item.room) == ("h", 9, 7)


def test_default_max_new_tokens_and_null_port() -> None:
    req = parse_generate(body(input_ids=[5, 6], bootstrap_port=None, bootstrap_room=1), 16)
    [item] = req.items
    assert item.max_new_tokens == 16 and item.port is None and item.prompt_tokens == 2
    assert item.input_ids == [5, 6]


def test_batch_of_texts_takes_list_fields() -> None:
    req = parse_generate(
        body(
            text=["a", "b c"],
            bootstrap_host=["h", "h"],
            bootstrap_port=[1, 2],
            bootstrap_room=[10, 11],
        ),
        3,
    )
    assert req.batch
    assert [(i.prompt_tokens, i.port, i.room) for i in req.items] == [(1, 1, 10), (2, 2, 11)]


def test_batch_of_input_ids_with_per_item_sampling_params() -> None:
    req = parse_generate(
        body(
            input_ids=[[1], [2, 3]],
            bootstrap_room=[1, 2],
            sampling_params=[{"max_new_tokens": 1}, {"max_new_tokens": 2}],
        ),
        16,
    )
    assert [(i.prompt_tokens, i.max_new_tokens) for i in req.items] == [(1, 1), (2, 2)]


def test_missing_room_is_none_not_an_error() -> None:
    # The app decides (400 with SGLang's message); parsing only reports it.
    assert parse_generate(body(text="x"), 1).items[0].room is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "Either text or input_ids"),
        ({"text": ["a", "b"], "bootstrap_room": [1]}, "bootstrap_room has 1 items"),
        ({"text": "a", "bootstrap_room": [1]}, "not a batch"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [1, "x"]}, "input_ids"),
    ],
)
def test_bad_generate_bodies(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_generate(body(**fields), 16)


def test_invalid_json() -> None:
    with pytest.raises(RequestError):
        parse_generate(b"{", 16)


def test_chat_counts_words_of_all_messages_and_honours_max_tokens() -> None:
    req = parse_openai(
        "chat",
        body(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi there you"}]},
            ],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            bootstrap_room=3,
            model="m",
        ),
        16,
    )
    [item] = req.items
    assert (item.prompt_tokens, item.max_new_tokens, item.room) == (5, 5, 3)
    assert req.stream and req.include_usage and req.model == "m"


def test_completion_prompt_forms() -> None:
    assert parse_openai("completion", body(prompt="a b"), 16).items[0].prompt_tokens == 2
    assert parse_openai("completion", body(prompt=[1, 2, 3]), 16).items[0].prompt_tokens == 3
    assert (
        parse_openai("completion", body(prompt="a", max_completion_tokens=2), 16)
        .items[0]
        .max_new_tokens
        == 2
    )


def test_chat_without_messages() -> None:
    with pytest.raises(RequestError, match="messages"):
        parse_openai("chat", body(prompt="x"), 16)
