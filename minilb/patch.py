"""Reading the few fields minilb needs from a request body, and adding the bootstrap fields.

The body is never re-serialised: `inspect` decodes a small view (everything else
is skipped by msgspec), and `inject` splices the three bootstrap fields in right
after the opening brace, so every other byte reaches the servers as the client
sent it. Only when the client already sent a `bootstrap_*` key is the object
rebuilt, from `msgspec.Raw` values, so that no key goes upstream twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from minilb.errors import BadRequest

BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
_WHITESPACE = b" \t\r\n"


class _GenerateView(msgspec.Struct):
    text: msgspec.Raw = msgspec.Raw()
    input_ids: msgspec.Raw = msgspec.Raw()
    stream: bool = False
    return_logprob: bool | list[bool] | None = None


class _OpenAIView(msgspec.Struct):
    stream: bool = False


_generate_decoder = msgspec.json.Decoder(_GenerateView)
_openai_decoder = msgspec.json.Decoder(_OpenAIView)
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_raw_dict_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What minilb learned from a generation request body."""

    batch_size: int | None  # None for a single request, else the number of prompts
    stream: bool
    return_logprob: bool


def _first_byte(raw: bytes) -> int:
    return raw[0] if raw else 0


def _batch_size(raw: msgspec.Raw, field: str) -> int | None:
    """Tell a batch from a single prompt by its shape, without decoding the prompts."""
    value = bytes(raw)
    if not value or value == b"null":
        return None
    first = _first_byte(value)
    if field == "text":
        if first == ord('"'):
            return None
        if first != ord("["):
            raise BadRequest("`text` must be a string or a list of strings")
        items = _raw_list_decoder.decode(value)
        if not all(_first_byte(bytes(item)) == ord('"') for item in items):
            raise BadRequest("`text` must be a string or a list of strings")
    else:
        if first != ord("["):
            raise BadRequest("`input_ids` must be a list of token ids or a list of such lists")
        items = _raw_list_decoder.decode(value)
        kinds = {_first_byte(bytes(item)) == ord("[") for item in items}
        if kinds != {True}:
            if True in kinds:
                raise BadRequest("`input_ids` mixes token ids and lists of token ids")
            return None
    if not items:
        raise BadRequest(f"`{field}` is an empty batch")
    return len(items)


def inspect(body: bytes, *, generate: bool) -> RequestInfo:
    """Validate the fields minilb reads; raise BadRequest naming the field otherwise."""
    if not body or body.isspace():
        raise BadRequest("request body is empty; expected a JSON object")
    if not body.isascii():
        # msgspec skips the strings it does not decode; make sure they are UTF-8 too.
        try:
            body.decode()
        except UnicodeDecodeError as exc:
            raise BadRequest(f"request body is not valid UTF-8 at byte {exc.start}") from None
    try:
        if not generate:
            oview = _openai_decoder.decode(body)
            return RequestInfo(batch_size=None, stream=oview.stream, return_logprob=False)
        view = _generate_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.startswith("Expected `object`"):
            message = "request body must be a JSON object"
        raise BadRequest(message) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    try:
        size = _batch_size(view.text, "text")
        ids_size = _batch_size(view.input_ids, "input_ids")
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if size is None:
        size = ids_size
    elif ids_size is not None and ids_size != size:
        raise BadRequest("`text` and `input_ids` hold batches of different sizes")
    logprob = view.return_logprob
    if isinstance(logprob, list):
        if size is not None and len(logprob) != size:
            raise BadRequest(f"`return_logprob` has {len(logprob)} items for a batch of {size}")
        want = any(logprob)
    else:
        want = bool(logprob)
    return RequestInfo(batch_size=size, stream=view.stream, return_logprob=want)


def encode_fields(host: str, port: int | None, rooms: int | list[int]) -> bytes:
    """The three bootstrap members, without braces: `"bootstrap_host":...,...`."""
    if isinstance(rooms, list):
        n = len(rooms)
        return b'"bootstrap_host":%s,"bootstrap_port":%s,"bootstrap_room":%s' % (
            _encoder.encode([host] * n),
            _encoder.encode([port] * n),
            _encoder.encode(rooms),
        )
    return b'"bootstrap_host":%s,"bootstrap_port":%s,"bootstrap_room":%d' % (
        _encoder.encode(host),
        b"null" if port is None else b"%d" % port,
        rooms,
    )


def inject(body: bytes, fields: bytes) -> bytes:
    """Return the body with `fields` as its first members; any client `bootstrap_*` is dropped.

    `body` must already have passed `inspect`, so it is a JSON object.
    """
    # A key can be spelt with escapes ("bootstrap\u005froom"), so any body with a
    # backslash-u is decoded too; only its top-level keys are, values stay Raw.
    if b"bootstrap" in body or b"\\u" in body:
        try:
            members = _raw_dict_decoder.decode(body)
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        if any(key in members for key in BOOTSTRAP_KEYS):
            for key in BOOTSTRAP_KEYS:
                members.pop(key, None)
            body = _encoder.encode(members)
    start = body.index(b"{") + 1
    rest = start
    while rest < len(body) and body[rest] in _WHITESPACE:
        rest += 1
    if rest < len(body) and body[rest] == ord("}"):
        return b"{%s%s" % (fields, body[rest:])
    return b"{%s,%s" % (fields, body[start:])
