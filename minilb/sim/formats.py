"""Pure builders of every response body and stream event the simulator sends.

Output tokens are deterministic: token i has id i and text `tok{i}`, joined
with spaces. Logprob values are deterministic functions of the position.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minilb.sim.requests import GenItem, GenRequest, Kind

_encoder = msgspec.json.Encoder()
encode = _encoder.encode

DONE = b"data: [DONE]\n\n"
_TOKENS = [f"tok{i}" for i in range(4096)]


def token_text(i: int) -> str:
    return _TOKENS[i] if i < len(_TOKENS) else f"tok{i}"


def output_text(n: int) -> str:
    """The text of the first `n` output tokens: `tok0 tok1 ...`."""
    return " ".join(token_text(i) for i in range(n))


def sse(obj: Any) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


def input_logprobs(item: GenItem) -> list[list[Any]]:
    ids = item.input_ids or range(item.prompt_tokens)
    return [[round(-0.1 * (j % 10 + 1), 2), tok, None] for j, tok in enumerate(ids)]


def output_logprobs(start: int, stop: int) -> list[list[Any]]:
    return [[round(-0.05 * (i % 10 + 1), 2), i, None] for i in range(start, stop)]


def finish_length(n: int) -> dict[str, Any]:
    return {"type": "length", "length": n}


def generate_result(
    item: GenItem,
    n: int,
    *,
    finished: bool,
    prefill: bool,
    logprob: bool,
    latency: float,
    text: str | None = None,
    index: int | None = None,
) -> dict[str, Any]:
    """One `/generate` result (or stream event) after `n` output tokens."""
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": finish_length(n) if finished else None,
        "prompt_tokens": item.prompt_tokens,
        "completion_tokens": n,
        "cached_tokens": 0,
        "e2e_latency": latency,
    }
    if logprob:
        # The decode never computes input logprobs; the balancer merges P's in.
        meta["input_token_logprobs"] = input_logprobs(item) if prefill else []
        meta["output_token_logprobs"] = output_logprobs(0, n)
    result: dict[str, Any] = {
        "text": output_text(n) if text is None else text,
        "output_ids": list(range(n)),
        "meta_info": meta,
    }
    if index is not None:
        result["index"] = index
    return result


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def openai_id(kind: Kind, rid: str) -> str:
    return f"chatcmpl-{rid}" if kind == "chat" else f"cmpl-{rid}"


def openai_result(req: GenRequest, model: str, n: int, created: int) -> dict[str, Any]:
    """A complete non-stream chat.completion / text_completion object."""
    item = req.items[0]
    text = output_text(n)
    choice: dict[str, Any]
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "reasoning_content": None,
                "tool_calls": None,
            },
            "logprobs": None,
            "finish_reason": "length",
            "matched_stop": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": "length",
            "matched_stop": None,
        }
        obj = "text_completion"
    return {
        "id": openai_id(req.kind, item.rid),
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(item.prompt_tokens, n),
    }


def openai_chunk(
    req: GenRequest,
    model: str,
    created: int,
    *,
    content: str | None,
    role: bool = False,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """One chat.completion.chunk / text_completion stream chunk."""
    choice: dict[str, Any]
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {
            "index": 0,
            "text": content or "",
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "text_completion"
    return {
        "id": openai_id(req.kind, req.items[0].rid),
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": None,
    }


def openai_usage_chunk(req: GenRequest, model: str, created: int, n: int) -> dict[str, Any]:
    item = req.items[0]
    return {
        "id": openai_id(req.kind, item.rid),
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(item.prompt_tokens, n),
    }


def generate_error(message: str) -> dict[str, Any]:
    """SGLang's native error body (`/generate`)."""
    return {"error": {"message": message}}


def openai_error(message: str, status: int) -> dict[str, Any]:
    """SGLang's OpenAI-compatible error body."""
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


def error_body(kind: Kind, message: str, status: int) -> bytes:
    if kind == "generate":
        return encode(generate_error(message))
    return encode(openai_error(message, status))


def stream_error_event(message: str, status: int) -> bytes:
    """An error after a stream started: one data event (then `[DONE]`)."""
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return sse({"error": {"message": message, "type": kind, "code": status}})


# SGLang's failure messages (python/sglang/srt/disaggregation/*/conn.py).
def prefill_timeout_message(room: int, elapsed: float) -> str:
    return (
        f"KVTransferError(bootstrap_room={room}): "
        f"Request {room} timed out after {elapsed:.1f}s in KVPoll.Bootstrapping"
    )


def decode_timeout_message(room: int, elapsed: float) -> str:
    return (
        f"KVTransferError(bootstrap_room={room}): "
        f"Request {room} timed out after {elapsed:.1f}s in KVPoll.WaitingForInput"
    )


def missing_room_message(role: str) -> str:
    return f"Disaggregation mode {role} requires bootstrap_room"


def duplicate_room_message(room: int) -> str:
    return f"bootstrap_room {room} is already in flight on this server (duplicate room)"
