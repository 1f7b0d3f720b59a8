"""Parse generation requests of the three endpoints into one normalized shape.

Only the fields the simulator reads are decoded (msgspec view Structs); the
rest of the body is skipped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Kind = Literal["generate", "chat", "completion"]


class RequestError(ValueError):
    """The request is malformed; answered with 400 and this message."""


class _GenerateView(msgspec.Struct):
    text: str | list[str] | None = None
    input_ids: list[Any] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = None  # SGLang's is Optional
    rid: str | list[str] | None = None
    bootstrap_host: str | list[str | None] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: int | list[int | None] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Message(msgspec.Struct):
    content: str | list[Any] | None = None


class _OpenAIView(msgspec.Struct):
    messages: list[_Message] | None = None
    prompt: str | list[Any] | None = None
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    rid: str | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


_generate_decoder = msgspec.json.Decoder(_GenerateView)
_openai_decoder = msgspec.json.Decoder(_OpenAIView)


@dataclass(slots=True)
class GenItem:
    """One sequence to generate: a single request has one, a batch several."""

    rid: str
    prompt_tokens: int
    input_ids: list[int] | None
    max_new_tokens: int
    room: int | None
    host: str | None
    port: int | None


@dataclass(slots=True)
class GenRequest:
    kind: Kind
    items: list[GenItem]
    batch: bool
    stream: bool
    return_logprob: bool
    include_usage: bool
    model: str | None


def _words(text: str) -> int:
    return len(text.split())


def _pick(value: Any, index: int, batch: bool, name: str, size: int) -> Any:
    """The item's value of a field that is a scalar (single) or a list (batch)."""
    if not batch:
        if isinstance(value, list):
            raise RequestError(f"{name} is a list but the request is not a batch")
        return value
    if isinstance(value, list):
        if len(value) != size:
            raise RequestError(f"{name} has {len(value)} items; the batch has {size}")
        return value[index]
    return value


def _max_tokens(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def parse_generate(body: bytes, default_max: int) -> GenRequest:
    """Parse a native `/generate` body (single or batch)."""
    try:
        view = _generate_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise RequestError(f"invalid /generate body: {exc}") from None
    prompts: list[tuple[int, list[int] | None]]
    if view.text is not None:
        batch = isinstance(view.text, list)
        texts = view.text if isinstance(view.text, list) else [view.text]
        prompts = [(_words(t), None) for t in texts]
    elif view.input_ids is not None:
        ids = view.input_ids
        batch = bool(ids) and isinstance(ids[0], list)
        seqs: list[Any] = ids if batch else [ids]
        prompts = []
        for seq in seqs:
            if not isinstance(seq, list) or not all(isinstance(t, int) for t in seq):
                raise RequestError("input_ids must be a list of ints or a list of lists of ints")
            prompts.append((len(seq), seq))
    else:
        raise RequestError("Either text or input_ids should be provided.")
    size = len(prompts)
    if batch and size == 0:
        raise RequestError("the batch is empty")
    logprob = view.return_logprob
    items = []
    for i, (n_prompt, input_ids) in enumerate(prompts):
        params = _pick(view.sampling_params, i, batch, "sampling_params", size) or {}
        rid = _pick(view.rid, i, batch, "rid", size) or uuid.uuid4().hex
        items.append(
            GenItem(
                rid=rid,
                prompt_tokens=n_prompt,
                input_ids=input_ids,
                max_new_tokens=_max_tokens(
                    params.get("max_new_tokens"), default_max, "sampling_params.max_new_tokens"
                ),
                room=_pick(view.bootstrap_room, i, batch, "bootstrap_room", size),
                host=_pick(view.bootstrap_host, i, batch, "bootstrap_host", size),
                port=_pick(view.bootstrap_port, i, batch, "bootstrap_port", size),
            )
        )
    return GenRequest(
        kind="generate",
        items=items,
        batch=batch,
        stream=view.stream,
        return_logprob=any(logprob) if isinstance(logprob, list) else bool(logprob),
        include_usage=False,
        model=None,
    )


def _content_words(content: str | list[Any] | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _words(content)
    # Content parts: count the words of the text parts only.
    return sum(
        _words(part["text"])
        for part in content
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def parse_openai(kind: Kind, body: bytes, default_max: int) -> GenRequest:
    """Parse a `/v1/chat/completions` or `/v1/completions` body."""
    try:
        view = _openai_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise RequestError(f"invalid request body: {exc}") from None
    if kind == "chat":
        if view.messages is None:
            raise RequestError("messages is required")
        n_prompt = sum(_content_words(m.content) for m in view.messages)
    else:
        if view.prompt is None:
            raise RequestError("prompt is required")
        if isinstance(view.prompt, str):
            n_prompt = _words(view.prompt)
        elif view.prompt and all(isinstance(t, int) for t in view.prompt):
            n_prompt = len(view.prompt)
        else:
            n_prompt = sum(_words(p) for p in view.prompt if isinstance(p, str))
    limit = view.max_completion_tokens if view.max_tokens is None else view.max_tokens
    item = GenItem(
        rid=view.rid or uuid.uuid4().hex,
        prompt_tokens=n_prompt,
        input_ids=None,
        max_new_tokens=_max_tokens(limit, default_max, "max_tokens"),
        room=view.bootstrap_room,
        host=view.bootstrap_host,
        port=view.bootstrap_port,
    )
    return GenRequest(
        kind=kind,
        items=[item],
        batch=False,
        stream=view.stream,
        return_logprob=False,
        include_usage=view.stream_options is not None and view.stream_options.include_usage,
        model=view.model,
    )
