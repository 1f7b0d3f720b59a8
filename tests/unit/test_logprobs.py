from __future__ import annotations

import json

import pytest

from minilb.logprobs import EventMerger, merge_json, prefill_stream_metas

PREFILL_META = {"input_token_logprobs": [[-0.1, 1, None], [-0.2, 2, None]], "prompt_tokens": 2}


def decode_item(index: int | None = None) -> dict[str, object]:
    item: dict[str, object] = {
        "text": "t",
        "meta_info": {"input_token_logprobs": [], "output_token_logprobs": [[-0.5, 9, None]]},
    }
    if index is not None:
        item["index"] = index
    return item


def test_merge_json_single() -> None:
    out = json.loads(
        merge_json(json.dumps(decode_item()).encode(), json.dumps({"meta_info": PREFILL_META}).encode())
    )
    assert out["meta_info"]["input_token_logprobs"] == PREFILL_META["input_token_logprobs"]
    assert out["meta_info"]["output_token_logprobs"] == [[-0.5, 9, None]]


def test_merge_json_batch_is_index_wise() -> None:
    prefill = [{"meta_info": {"input_token_logprobs": [[-1.0, i, None]]}} for i in range(2)]
    out = json.loads(merge_json(json.dumps([decode_item(), decode_item()]).encode(),
                                json.dumps(prefill).encode()))
    assert [o["meta_info"]["input_token_logprobs"][0][1] for o in out] == [0, 1]


def test_merge_leaves_items_without_meta_alone() -> None:
    out = json.loads(merge_json(b'{"error": "x"}', json.dumps({"meta_info": PREFILL_META}).encode()))
    assert out == {"error": "x"}


def sse(*values: object) -> bytes:
    return b"".join(b"data: " + json.dumps(v).encode() + b"\n\n" for v in values) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
def test_event_merger_handles_any_split(piece: int) -> None:
    metas = prefill_stream_metas(sse({"meta_info": PREFILL_META}))
    stream = sse(decode_item(), decode_item())
    merger = EventMerger(metas)
    out = b"".join(merger.feed(stream[i : i + piece]) for i in range(0, len(stream), piece))
    out += merger.flush()
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    for event in events[:-1]:
        meta = json.loads(event[6:])["meta_info"]
        assert meta["input_token_logprobs"] == PREFILL_META["input_token_logprobs"]


def test_event_merger_uses_the_batch_index() -> None:
    metas = prefill_stream_metas(
        sse({"index": 0, "meta_info": {"input_token_logprobs": [[0.0, 10, None]]}},
            {"index": 1, "meta_info": {"input_token_logprobs": [[0.0, 11, None]]}})
    )
    merger = EventMerger(metas)
    out = merger.feed(sse(decode_item(1), decode_item(0)))
    ids = [json.loads(e[6:])["meta_info"]["input_token_logprobs"][0][1]
           for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert ids == [11, 10]


def test_event_merger_passes_non_json_events_through() -> None:
    merger = EventMerger({})
    assert merger.feed(b": keep-alive\n\ndata: not json\n\n") == b": keep-alive\n\ndata: not json\n\n"
