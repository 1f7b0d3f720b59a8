"""Merging the prefill's input logprobs into the decode's answer (pd-protocol section 2).

The decode never computes input logprobs; the prefill does. These functions
are pure: they take decoded JSON values and SSE bytes and return new ones.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

INPUT_LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def merge_meta(decode_item: Any, prefill_meta: dict[str, Any] | None) -> None:
    """Prepend the prefill's input logprob lists to the decode item's, in place."""
    if not prefill_meta or not isinstance(decode_item, dict):
        return
    meta = decode_item.get("meta_info")
    if not isinstance(meta, dict):
        return
    for key in INPUT_LOGPROB_KEYS:
        head = prefill_meta.get(key)
        if isinstance(head, list):
            tail = meta.get(key)
            meta[key] = head + tail if isinstance(tail, list) else head


def _meta_by_index(value: Any) -> dict[int, dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    metas: dict[int, dict[str, Any]] = {}
    for position, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("meta_info"), dict):
            index = item.get("index", position)
            metas[index if isinstance(index, int) else position] = item["meta_info"]
    return metas


def merge_json(decode_body: bytes, prefill_body: bytes) -> bytes:
    """A non-stream /generate answer (object, or list for a batch) with input logprobs."""
    decoded = _decoder.decode(decode_body)
    metas = _meta_by_index(_decoder.decode(prefill_body))
    items = decoded if isinstance(decoded, list) else [decoded]
    for position, item in enumerate(items):
        merge_meta(item, metas.get(position))
    return _encoder.encode(decoded)


def sse_data(body: bytes) -> list[Any]:
    """The JSON values of the `data:` events of a whole SSE body, `[DONE]` left out."""
    values = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    with contextlib.suppress(msgspec.DecodeError):
                        values.append(_decoder.decode(payload))
    return values


def prefill_stream_metas(body: bytes) -> dict[int, dict[str, Any]]:
    """The prefill's meta_info per batch index, from its (short) SSE answer."""
    metas: dict[int, dict[str, Any]] = {}
    for value in sse_data(body):
        metas.update(_meta_by_index(value))
    return metas


class EventMerger:
    """Cuts a decode SSE byte stream into events and merges logprobs into each.

    Events may span reads and be of any size; an event is complete at a blank line.
    """

    def __init__(self, metas: dict[int, dict[str, Any]]) -> None:
        self._metas = metas
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2 :]
        return b"".join(self._event(event) for event in data[:end].split(b"\n\n"))

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, event: bytes) -> bytes:
        if event.startswith(b"data:") and b"\n" not in event:
            payload = event[5:].strip()
            if payload != b"[DONE]":
                try:
                    value = _decoder.decode(payload)
                except msgspec.DecodeError:
                    return event + b"\n\n"
                index = value.get("index", 0) if isinstance(value, dict) else 0
                merge_meta(value, self._metas.get(index if isinstance(index, int) else 0))
                return b"data: " + _encoder.encode(value) + b"\n\n"
        return event + b"\n\n"
