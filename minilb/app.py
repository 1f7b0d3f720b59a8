"""The ASGI application: routing, access control, lifespan and the `minilb.app:app` entry point."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec

from minilb import config as config_mod
from minilb.accesslog import RequestLog, access_logger, request_id
from minilb.admin import Admin
from minilb.admission import Admission
from minilb.config import Config
from minilb.control import ControlPlane
from minilb.errors import HTTPError, MethodNotAllowed, NotFound
from minilb.health import HealthTracker, Prober
from minilb.membership import Membership
from minilb.metrics import ROUTE_INDEX, Metrics, render
from minilb.patch import inspect
from minilb.policy import make_selector
from minilb.proxy import PDProxy
from minilb.responses import ClientGone, header, read_body, send_bytes, send_error
from minilb.shared import SharedState
from minilb.transport import LeanTransport
from minilb.types import Receive, Scope, Send
from minilb.upstream import sender_for

logger = logging.getLogger("minilb")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_FORWARDED = frozenset({b"authorization", b"traceparent"})
_PROMETHEUS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]


class Unauthorized(HTTPError):
    status = 401
    type = "authentication_error"


class Runtime:
    """What one worker builds at start-up: its transport, client, proxy and prober."""

    def __init__(
        self,
        config: Config,
        shared: SharedState,
        transport: httpx.AsyncBaseTransport | None,
        slot: int,
    ) -> None:
        self.transport = transport or LeanTransport(connect_timeout=config.connect_timeout_secs)
        rng = random.Random()  # seeded per worker: rooms must differ across forked workers
        self.membership = Membership(shared)
        self.metrics = Metrics(shared.metrics, slot)
        self.proxy = PDProxy(
            self.membership,
            make_selector(config.policy, shared.tickets, rng),
            sender_for(self.transport),
            timeout=config.timeout_secs,
            rng=rng,
            metrics=self.metrics,
            max_attempts=config.max_attempts,
            backoff=config.retry_backoff_secs,
            stream_window=config.stream_coalesce_ms / 1000,
            # With a client key, the client's Authorization is minilb's, not the servers'.
            forward_headers=_FORWARDED - {b"authorization"} if config.api_key else _FORWARDED,
        )
        self.admission = Admission(shared, config.max_in_flight, slot)
        self.client = httpx.AsyncClient(
            transport=self.transport,
            timeout=httpx.Timeout(min(config.timeout_secs, 60.0), connect=config.connect_timeout_secs),
        )
        self.control = ControlPlane(self.membership, self.client)
        self.admin = Admin(self.membership)
        self.prober = Prober(
            self.membership,
            self.client,
            interval=config.health_check_interval_secs,
            timeout=config.health_check_timeout_secs,
            tracker=HealthTracker(config.health_failure_threshold, config.health_success_threshold),
        )
        self._prober_task: asyncio.Task[None] | None = None

    def start_prober(self) -> None:
        if self._prober_task is None:
            self._prober_task = asyncio.get_running_loop().create_task(self.prober.run())

    async def aclose(self) -> None:
        if self._prober_task is not None:
            self._prober_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober_task
        await self.client.aclose()  # closes the shared transport too


def _key_matches(scope: Scope, key: str) -> bool:
    given = header(scope, b"authorization") or b""
    scheme, _, token = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


class MiniLB:
    """The balancer as a raw ASGI app; build it with `create_app`."""

    def __init__(
        self,
        config: Config,
        *,
        shared: SharedState | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        slot: int = 0,
    ) -> None:
        self.config = config
        if shared is None:  # one process on its own: nobody made the table before fork
            shared = SharedState()
            Membership(shared).initialise(config)
        self.shared = shared
        self._transport = transport
        self._slot = slot
        self.runtime: Runtime | None = None
        self._routes: dict[str, dict[str, Handler]] = {
            "/generate": {"POST": self._generate},
            "/v1/chat/completions": {"POST": self._openai},
            "/v1/completions": {"POST": self._openai},
            "/health": {"GET": self._health},
            "/readiness": {"GET": self._readiness},
            "/health_generate": {"GET": self._health_generate},
            "/flush_cache": {"POST": self._flush_cache, "GET": self._flush_cache},
            "/get_server_info": {"GET": self._server_info},
            "/server_info": {"GET": self._server_info},
            "/get_model_info": {"GET": self._model_info},
            "/model_info": {"GET": self._model_info},
            "/v1/models": {"GET": self._models},
            "/register": {"POST": self._register},
            "/workers": {"GET": self._list_workers, "POST": self._add_worker},
            "/metrics": {"GET": self._metrics},
        }
        self._inference = {"/generate", "/v1/chat/completions", "/v1/completions"}
        self._admin = {"/register", "/workers", "/flush_cache"}
        if not config.admin_key:
            logger.warning("no admin key: /register, /workers and /flush_cache are open to anyone")
        if not config.api_key:
            logger.info("no API key: the inference routes are open to anyone")
        self._access = access_logger(config.access_log)

    def _start(self) -> Runtime:
        if self.runtime is None:
            self.runtime = Runtime(self.config, self.shared, self._transport, self._slot)
        return self.runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    def _route(self, scope: Scope) -> Handler:
        path: str = scope["path"]
        methods = self._routes.get(path)
        if methods is None and path.startswith("/workers/"):
            methods = {"DELETE": self._remove_worker}
            path = "/workers"
        if methods is None:
            raise NotFound(f"no route {path!r}; see the README for the endpoints")
        if path in self._admin and self.config.admin_key and not _key_matches(scope, self.config.admin_key):
            raise Unauthorized(f"{path} needs the admin key as 'Authorization: Bearer KEY'")
        if path in self._inference and self.config.api_key and not _key_matches(scope, self.config.api_key):
            raise Unauthorized("a valid API key is needed as 'Authorization: Bearer KEY'")
        handler = methods.get(scope["method"])
        if handler is None:
            if scope["method"] == "HEAD" and "GET" in methods:
                return methods["GET"]
            allowed = tuple(methods)
            raise MethodNotAllowed(
                f"{scope['method']} is not allowed on {path}; use {', '.join(allowed)}", allowed=allowed
            )
        return handler

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime or self._start()
        log = RequestLog(scope, send, request_id(scope))
        scope["minilb.request"] = log
        send = log.send
        try:
            await self._route(scope)(scope, receive, send)
        except Unauthorized as error:
            await send_error(send, error, [(b"www-authenticate", b"Bearer")], log.rid)
        except HTTPError as error:
            extra = None
            if error.status == 429:
                extra = [(b"retry-after", b"1")]
                runtime.metrics.rejected()
            await send_error(send, error, extra, log.rid)
        except ClientGone:
            return
        except Exception:
            # A bug, not the client's fault: log it, and answer in the same shape as
            # every other error (when the response has not started, else uvicorn ends it).
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            with contextlib.suppress(Exception):
                await send_error(send, HTTPError("internal error in minilb; see its log"), None, log.rid)
        finally:
            # scope -> log -> the server's send -> its cycle -> scope: a reference cycle
            # per request, left to the cyclic GC, whose pauses showed as tail latency.
            del scope["minilb.request"]
            elapsed = time.perf_counter() - log.start
            route = _route_index(scope["path"])
            runtime.metrics.request(route, log.status, elapsed)
            if log.streamed:
                runtime.metrics.first_byte(route, log.first_byte)
            if self._access is not None:
                self._access.info(log.line(self.config.access_log, elapsed))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._start().start_prober()
                    _quiet_gc()
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
        runtime.admission.enter()
        try:
            await runtime.proxy.forward(scope, receive, send, body, info, scope["minilb.request"])
        finally:
            runtime.admission.leave()

    # control plane

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, b"")

    async def _readiness(self, scope: Scope, receive: Receive, send: Send) -> None:
        servers = self._start().membership.servers()
        missing = [role for role, healthy in (("prefill", servers.healthy_prefill),
                                               ("decode", servers.healthy_decode)) if not healthy]
        body: dict[str, Any] = {
            "ready": not missing,
            "healthy_prefill": len(servers.healthy_prefill),
            "healthy_decode": len(servers.healthy_decode),
        }
        if missing:
            body["error"] = {
                "message": f"no healthy {' and no healthy '.join(missing)} server",
                "type": "service_unavailable_error",
                "code": 503,
            }
        await send_bytes(send, 503 if missing else 200, _json(body))

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

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self._start()
        await send_bytes(send, 200, render(self.shared.metrics, self.shared, runtime.membership), _PROMETHEUS)

    # membership

    async def _register(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, 64 * 1024)
        await self._start().admin.register(send, body)

    async def _add_worker(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, 64 * 1024)
        await self._start().admin.add_worker(send, body)

    async def _list_workers(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().admin.list_workers(send)

    async def _remove_worker(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._start().admin.remove_worker(send, scope["path"])


def _quiet_gc() -> None:
    """Fewer, shorter garbage collections: a proxy allocates many short-lived objects
    per request, and each full collection walked every module and object made at
    start-up, showing up as tail latency."""
    gc.collect()
    gc.freeze()  # what exists now lives as long as the worker: never scan it again
    gc.set_threshold(20_000, 50, 100)


def _route_index(path: str) -> int:
    index = ROUTE_INDEX.get(path)
    if index is None:
        index = ROUTE_INDEX["/workers" if path.startswith("/workers/") else "other"]
    return index


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


def create_app(
    config: Config,
    *,
    shared: SharedState | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    slot: int = 0,
) -> MiniLB:
    """Build the balancer. `shared` is the state made before fork (with its server table
    filled); `transport` replaces the upstream HTTP transport (tests pass
    `httpx.MockTransport`); `slot` is this worker's slot in the shared in-flight count."""
    return MiniLB(config, shared=shared, transport=transport, slot=slot)


class _EntryPoint:
    """`minilb.app:app` for Gunicorn and uvicorn: built from the environment on first use,
    with the shared state the Gunicorn master made before forking this worker."""

    def __init__(self) -> None:
        self._app: MiniLB | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            from minilb.gunicorn_hooks import inherited

            shared, slot = inherited()
            self._app = create_app(config_mod.from_env(), shared=shared, slot=slot)
        await self._app(scope, receive, send)


app = _EntryPoint()
