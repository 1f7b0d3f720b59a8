"""The ASGI application: routing, lifespan and the `minilb.app:app` entry point."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from minilb import config as config_mod
from minilb.config import Config
from minilb.control import ControlPlane
from minilb.errors import BadRequest, HTTPError, MethodNotAllowed, NotFound
from minilb.patch import inspect
from minilb.policy import make_selector
from minilb.proxy import PDProxy
from minilb.responses import ClientGone, read_body, send_bytes, send_error
from minilb.servers import ServerSet
from minilb.shared import SharedState
from minilb.transport import LeanTransport
from minilb.types import Receive, Scope, Send

logger = logging.getLogger("minilb")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class Runtime:
    """What one worker builds at start-up: its transport, client and proxy."""

    def __init__(
        self, config: Config, shared: SharedState, transport: httpx.AsyncBaseTransport | None
    ) -> None:
        self.transport = transport or LeanTransport(connect_timeout=config.connect_timeout_secs)
        rng = random.Random()  # seeded per worker: rooms must differ across forked workers
        self.servers = ServerSet.from_config(config)
        self.proxy = PDProxy(
            self.servers,
            make_selector(config.policy, shared.tickets, rng),
            self.transport,
            timeout=config.timeout_secs,
            rng=rng,
        )
        self.client = httpx.AsyncClient(
            transport=self.transport,
            timeout=httpx.Timeout(min(config.timeout_secs, 60.0), connect=config.connect_timeout_secs),
        )
        self.control = ControlPlane(self.servers, self.client)

    async def aclose(self) -> None:
        await self.client.aclose()  # closes the shared transport too


class MiniLB:
    """The balancer as a raw ASGI app; build it with `create_app`."""

    def __init__(
        self,
        config: Config,
        *,
        shared: SharedState | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.shared = shared or SharedState()
        self._transport = transport
        self.runtime: Runtime | None = None
        self._routes: dict[str, dict[str, Handler]] = {
            "/generate": {"POST": self._generate},
            "/v1/chat/completions": {"POST": self._openai},
            "/v1/completions": {"POST": self._openai},
            "/health": {"GET": self._health},
            "/health_generate": {"GET": self._health_generate},
            "/flush_cache": {"POST": self._flush_cache, "GET": self._flush_cache},
            "/get_server_info": {"GET": self._server_info},
            "/server_info": {"GET": self._server_info},
            "/get_model_info": {"GET": self._model_info},
            "/model_info": {"GET": self._model_info},
            "/v1/models": {"GET": self._models},
        }

    def _start(self) -> Runtime:
        if self.runtime is None:
            self.runtime = Runtime(self.config, self.shared, self._transport)
        return self.runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self._routes.get(scope["path"])
        try:
            if methods is None:
                raise NotFound(f"no route {scope['path']!r}; see the README for the endpoints")
            handler = methods.get(scope["method"])
            if handler is None:
                if scope["method"] == "HEAD" and "GET" in methods:
                    handler = methods["GET"]
                else:
                    allowed = tuple(methods)
                    raise MethodNotAllowed(
                        f"{scope['method']} is not allowed on {scope['path']}; use {', '.join(allowed)}",
                        allowed=allowed,
                    )
            await handler(scope, receive, send)
        except HTTPError as error:
            await send_error(send, error)
        except ClientGone:
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._start()
                except Exception as exc:  # report, so the server refuses to start
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.runtime is not None:
                    await self.runtime.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # generation

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._forward(scope, receive, send, generate=True)

    async def _openai(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._forward(scope, receive, send, generate=False)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, *, generate: bool) -> None:
        runtime = self.runtime or self._start()
        body = await read_body(scope, receive, self.config.max_body_bytes)
        info = inspect(body, generate=generate)
        await runtime.proxy.forward(scope, receive, send, body, info)

    # control plane

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, b"")

    async def _health_generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().control.fan_out(send, "GET", "/health_generate")

    async def _flush_cache(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().control.fan_out(send, "POST", "/flush_cache")

    async def _server_info(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().control.server_info(send)

    async def _model_info(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().control.from_prefill(send, "/get_model_info")

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().control.from_prefill(send, "/v1/models")


def create_app(
    config: Config,
    *,
    shared: SharedState | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> MiniLB:
    """Build the balancer. `shared` is the state made before fork; `transport` replaces
    the upstream HTTP transport (tests pass `httpx.MockTransport`)."""
    return MiniLB(config, shared=shared, transport=transport)


class _EntryPoint:
    """`minilb.app:app` for Gunicorn and uvicorn: built from the environment on first use,
    with the shared state the Gunicorn master made before forking this worker."""

    def __init__(self) -> None:
        self._app: MiniLB | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            from minilb.gunicorn_hooks import inherited_state

            self._app = create_app(config_mod.from_env(), shared=inherited_state())
        await self._app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


app = _EntryPoint()

__all__ = ["BadRequest", "MiniLB", "app", "create_app"]
