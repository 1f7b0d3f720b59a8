"""Simulator settings: the fixed config and the knobs that change at run time."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Role = Literal["prefill", "decode"]

# SGLang's default --disaggregation-bootstrap-port.
DEFAULT_BOOTSTRAP_PORT = 8998

Seconds = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]


class Knobs(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Latency and fault settings; `POST /_sim/knobs` replaces any subset of them."""

    pair_timeout: Annotated[float, Meta(gt=0)] = 5.0
    prefill_delay_per_token: Seconds = 0.0
    ttft: Seconds = 0.0
    itl: Seconds = 0.0
    jitter: Fraction = 0.0
    fail_status: Annotated[int, Meta(ge=100, le=599)] = 500
    fail_probability: Fraction = 0.0
    fail_next: Annotated[int, Meta(ge=0)] = 0
    reset_after_events: Annotated[int, Meta(ge=0)] = 0
    hang: bool = False
    slow_headers: Seconds = 0.0
    health_fail: bool = False
    bootstrap_down: bool = False
    skip_bootstrap: bool = False
    max_new_tokens_default: Annotated[int, Meta(ge=1)] = 16


class SimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a simulator process is; fixed for its lifetime."""

    role: Role
    host: str = "127.0.0.1"
    port: int = 30000
    # The prefill listens here; the decode uses it for `bootstrap_port: null`.
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    model: str = "minilb-sim"
    knobs: Knobs = msgspec.field(default_factory=Knobs)


class KnobsError(ValueError):
    """A knob update was rejected; the message names the knob and the rule."""


def update_knobs(current: Knobs, patch: bytes) -> Knobs:
    """Return `current` with the JSON object `patch` applied, validated as a whole."""
    try:
        changes = msgspec.json.decode(patch, type=dict[str, Any])
    except msgspec.ValidationError as exc:
        raise KnobsError(f"knobs must be a JSON object: {exc}") from None
    except msgspec.DecodeError as exc:
        raise KnobsError(f"knobs body is not valid JSON: {exc}") from None
    merged = msgspec.structs.asdict(current)
    merged.update(changes)
    try:
        return msgspec.convert(merged, Knobs)
    except msgspec.ValidationError as exc:
        raise KnobsError(str(exc)) from None


def knobs_json(knobs: Knobs) -> bytes:
    return msgspec.json.encode(knobs)
