"""The `minilb` command line: serve, demo, sim, check-config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from minilb import __version__
from minilb import config as config_mod
from minilb.config import Config
from minilb.errors import ConfigError
from minilb.sim.cli import sim

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="minilb: a load balancer for SGLang prefill/decode disaggregated serving.",
)
cli.command("sim")(sim)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minilb {__version__}")
        raise typer.Exit()


@cli.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """minilb: a load balancer for SGLang prefill/decode disaggregated serving."""


def parse_prefill(value: str) -> dict[str, Any]:
    """`URL` or `URL PORT` (sgl-router's `--prefill URL [BOOTSTRAP_PORT]`); `none` means null."""
    parts = value.split()
    if len(parts) not in (1, 2):
        raise ConfigError(f"--prefill {value!r}: expected URL [BOOTSTRAP_PORT]")
    if len(parts) == 1 or (_is_port_word(parts[1]) and not parts[1].isdigit()):
        return {"url": parts[0], "bootstrap_port": None}
    if not parts[1].isdigit():
        raise ConfigError(f"--prefill {value!r}: bootstrap port {parts[1]!r} is not a number or 'none'")
    return {"url": parts[0], "bootstrap_port": int(parts[1])}


def join_prefill_ports(argv: list[str]) -> list[str]:
    """Let `--prefill URL PORT` be two words, as sgl-router accepts, by joining them."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--prefill" and i + 2 < len(argv) and _is_port_word(argv[i + 2]):
            out.append(f"{argv[i + 1]} {argv[i + 2]}")
            i += 3
        else:
            i += 1
    return out


def _is_port_word(word: str) -> bool:
    return word.isdigit() or word.lower() in ("none", "null")


def build_config(
    config_file: Path | None,
    prefill: list[str] | None,
    decode: list[str] | None,
    **values: Any,
) -> Config:
    overrides = dict(values)
    if prefill:
        overrides["prefill"] = [parse_prefill(p) for p in prefill]
    if decode:
        overrides["decode"] = [{"url": d} for d in decode]
    if config_file is not None:
        return config_mod.load_file(config_file, **overrides)
    return config_mod.build(**overrides)


def _fail(error: ConfigError) -> typer.Exit:
    typer.secho(f"minilb: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", envvar="MINILB_CONFIG", help="A TOML config file.")
]
HostOpt = Annotated[str | None, typer.Option(envvar="MINILB_HOST", help="Address to listen on [127.0.0.1].")]
PortOpt = Annotated[int | None, typer.Option(envvar="MINILB_PORT", help="Port to listen on [8000].")]
PrefillOpt = Annotated[
    list[str] | None,
    typer.Option("--prefill", help="Prefill server: URL [BOOTSTRAP_PORT|none]; repeat for more."),
]
DecodeOpt = Annotated[list[str] | None, typer.Option("--decode", help="Decode server URL; repeat for more.")]
PolicyOpt = Annotated[
    str | None, typer.Option(envvar="MINILB_POLICY", help="round_robin (default) or random.")
]
WorkersOpt = Annotated[int | None, typer.Option(envvar="MINILB_WORKERS", help="Worker processes [1].")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--request-timeout-secs", envvar="MINILB_TIMEOUT_SECS", help="Per-request timeout [1800]."),
]
BodyOpt = Annotated[
    int | None, typer.Option(envvar="MINILB_MAX_BODY_BYTES", help="Largest request body [64 MiB].")
]
LogOpt = Annotated[str | None, typer.Option(envvar="MINILB_LOG_LEVEL", help="debug, info, warning, error.")]
AccessOpt = Annotated[
    str | None, typer.Option(envvar="MINILB_ACCESS_LOG", help="Access log: off (default), plain or json.")
]
AttemptsOpt = Annotated[
    int | None, typer.Option(envvar="MINILB_MAX_ATTEMPTS", help="Tries per request on different pairs [3].")
]
InFlightOpt = Annotated[
    int | None,
    typer.Option(envvar="MINILB_MAX_IN_FLIGHT", help="Cap on requests in flight; then 429 [0: none]."),
]
HealthOpt = Annotated[
    float | None, typer.Option(envvar="MINILB_HEALTH_INTERVAL", help="Seconds between health checks [5].")
]
CoalesceOpt = Annotated[
    float | None,
    typer.Option(
        envvar="MINILB_STREAM_COALESCE_MS",
        help="Stream events arriving within this many ms of the last write go out together [2; 0: off].",
    ),
]
AdminKeyOpt = Annotated[
    str | None, typer.Option(envvar="MINILB_ADMIN_KEY", help="Bearer key for the admin routes.")
]
ApiKeyOpt = Annotated[
    str | None, typer.Option(envvar="MINILB_API_KEY", help="Bearer key for the inference routes.")
]


@cli.command()
def serve(
    config_file: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    prefill: PrefillOpt = None,
    decode: DecodeOpt = None,
    policy: PolicyOpt = None,
    workers: WorkersOpt = None,
    timeout_secs: TimeoutOpt = None,
    max_body_bytes: BodyOpt = None,
    log_level: LogOpt = None,
    access_log: AccessOpt = None,
    max_attempts: AttemptsOpt = None,
    max_in_flight: InFlightOpt = None,
    health_check_interval_secs: HealthOpt = None,
    stream_coalesce_ms: CoalesceOpt = None,
    admin_key: AdminKeyOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Run the balancer under Gunicorn with uvicorn workers."""
    from minilb.serve import run

    try:
        config = build_config(
            config_file, prefill, decode, host=host, port=port, policy=policy, workers=workers,
            timeout_secs=timeout_secs, max_body_bytes=max_body_bytes, log_level=log_level,
            access_log=access_log, max_attempts=max_attempts, max_in_flight=max_in_flight,
            health_check_interval_secs=health_check_interval_secs, stream_coalesce_ms=stream_coalesce_ms,
            admin_key=admin_key, api_key=api_key,
        )
    except ConfigError as error:
        raise _fail(error) from None
    run(config)


@cli.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="The TOML file to check.")]) -> None:
    """Validate a config file and print what it configures."""
    try:
        config = config_mod.load_file(path)
    except ConfigError as error:
        raise _fail(error) from None
    typer.echo(f"{path}: valid")
    typer.echo(f"  listen  {config.host}:{config.port}, {config.workers} worker(s), {config.policy}")
    for p in config.prefill:
        port = "none" if p.bootstrap_port is None else p.bootstrap_port
        typer.echo(f"  prefill {p.url} (bootstrap port {port})")
    for d in config.decode:
        typer.echo(f"  decode  {d.url}")


@cli.command()
def status(
    url: Annotated[str, typer.Option(envvar="MINILB_URL", help="The balancer's address.")] = "http://127.0.0.1:8000",
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    admin_key: AdminKeyOpt = None,
) -> None:
    """A table of the servers behind a running balancer: health, load, requests, errors."""
    from minilb.status import StatusError, show

    try:
        show(url, watch=watch, interval=interval, admin_key=admin_key)
    except StatusError as error:
        typer.secho(f"minilb: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@cli.command()
def demo(
    port: Annotated[int, typer.Option(envvar="MINILB_PORT", help="Port for the balancer.")] = 8000,
    host: Annotated[str, typer.Option(envvar="MINILB_HOST", help="Address for the balancer.")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(envvar="MINILB_WORKERS", help="Worker processes.")] = 2,
) -> None:
    """Start 2 prefill and 2 decode simulators and the balancer; Ctrl-C stops all."""
    from minilb.demo import run_demo

    try:
        run_demo(host=host, port=port, workers=workers)
    except ConfigError as error:
        raise _fail(error) from None


def main() -> None:
    sys.argv[1:] = join_prefill_ports(sys.argv[1:])
    cli()
