"""`minilb sim`: run a simulated SGLang prefill or decode server."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import typer

from minilb.sim.knobs import DEFAULT_BOOTSTRAP_PORT, Knobs, SimConfig


def _opt(help: str, name: str) -> Any:
    return typer.Option(help=help, envvar=f"MINILB_SIM_{name}")


def sim(
    role: Annotated[str, _opt("prefill or decode.", "ROLE")] = "prefill",
    host: Annotated[str, _opt("Address to listen on.", "HOST")] = "127.0.0.1",
    port: Annotated[int, _opt("HTTP port.", "PORT")] = 30000,
    bootstrap_port: Annotated[
        int,
        _opt(
            "Prefill: port of its bootstrap listener. Decode: the port used when a request "
            "carries bootstrap_port null.",
            "BOOTSTRAP_PORT",
        ),
    ] = DEFAULT_BOOTSTRAP_PORT,
    pair_timeout: Annotated[
        float,
        _opt("Seconds both sides wait for their partner before failing with 500.", "PAIR_TIMEOUT"),
    ] = 5.0,
    prefill_delay_per_token: Annotated[
        float,
        _opt(
            "Seconds of compute per prompt token before the first token.", "PREFILL_DELAY_PER_TOKEN"
        ),
    ] = 0.0,
    ttft: Annotated[float, _opt("Extra seconds before the first token.", "TTFT")] = 0.0,
    itl: Annotated[float, _opt("Seconds between output tokens.", "ITL")] = 0.0,
    jitter: Annotated[float, _opt("Random +-fraction applied to every delay.", "JITTER")] = 0.0,
    fail_status: Annotated[int, _opt("Status of injected failures.", "FAIL_STATUS")] = 500,
    fail_probability: Annotated[
        float, _opt("Probability that a generation request fails.", "FAIL_PROBABILITY")
    ] = 0.0,
    fail_next: Annotated[int, _opt("The next K generation requests fail.", "FAIL_NEXT")] = 0,
    reset_after_events: Annotated[
        int, _opt("Drop the connection after K stream events (0: never).", "RESET_AFTER_EVENTS")
    ] = 0,
    hang: Annotated[
        bool, _opt("Generation requests never answer until the client leaves.", "HANG")
    ] = False,
    slow_headers: Annotated[
        float, _opt("Seconds before the status line of generation responses.", "SLOW_HEADERS")
    ] = 0.0,
    health_fail: Annotated[
        bool, _opt("/health and /health_generate answer 503.", "HEALTH_FAIL")
    ] = False,
    bootstrap_down: Annotated[
        bool, _opt("Prefill: the bootstrap listener drops every connection.", "BOOTSTRAP_DOWN")
    ] = False,
    skip_bootstrap: Annotated[
        bool, _opt("Decode: never contact the prefill (the decode never joins).", "SKIP_BOOTSTRAP")
    ] = False,
    max_new_tokens_default: Annotated[
        int,
        _opt(
            "max_new_tokens when a request sets none (SGLang's default is 128).",
            "MAX_NEW_TOKENS_DEFAULT",
        ),
    ] = 16,
    model: Annotated[str, _opt("Served model name.", "MODEL")] = "minilb-sim",
) -> None:
    """Run a simulated SGLang prefill or decode server (for tests and benchmarks)."""
    from minilb.sim.server import run

    try:
        knobs = msgspec.convert(
            dict(
                pair_timeout=pair_timeout,
                prefill_delay_per_token=prefill_delay_per_token,
                ttft=ttft,
                itl=itl,
                jitter=jitter,
                fail_status=fail_status,
                fail_probability=fail_probability,
                fail_next=fail_next,
                reset_after_events=reset_after_events,
                hang=hang,
                slow_headers=slow_headers,
                health_fail=health_fail,
                bootstrap_down=bootstrap_down,
                skip_bootstrap=skip_bootstrap,
                max_new_tokens_default=max_new_tokens_default,
            ),
            Knobs,
        )
        config = msgspec.convert(
            dict(role=role, host=host, port=port, bootstrap_port=bootstrap_port, model=model),
            SimConfig,
        )
    except msgspec.ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = msgspec.structs.replace(config, knobs=knobs)
    run(config)
