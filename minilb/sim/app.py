"""The simulator's raw-ASGI application: routing, info endpoints and admin routes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

import msgspec

from minilb.sim import formats
from minilb.sim.bootstrap import BootstrapClient, start_listener
from minilb.sim.formats import encode
from minilb.sim.generation import JSON_HEADERS, Exchange, Generator
from minilb.sim.knobs import KnobsError, SimConfig, knobs_json, update_knobs
from minilb.sim.pairing import RoomRegistry
from minilb.sim.requests import GenRequest, Kind, RequestError, parse_generate, parse_openai
from minilb.sim.stats import Stats
from minilb.sim.types import Receive, Scope, Send

_GENERATION_ROUTES: dict[str, Kind] = {
    "/generate": "generate",
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
}
_NOT_FOUND = encode({"detail": "Not Found"})
_NOT_ALLOWED = encode({"detail": "Method Not Allowed"})
_FLUSH_TEXT = (
    b"Cache flushed.\nPlease check backend logs for more details. (When there are running "
    b"or waiting requests, the operation will not be performed.)\n"
)
_TEXT_HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


class _AbortView(msgspec.Struct):
    rid: str | None = None
    abort_all: bool = False


class SimApp:
    """A simulated SGLang server of one role; an ASGI application.

    The prefill's bootstrap listener is started in the ASGI lifespan, so the
    app runs the same under `minilb sim` and any ASGI server with lifespan on.
    """

    def __init__(self, config: SimConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        # A private copy: run-time knob changes must not touch the frozen config.
        self.knobs = msgspec.structs.replace(config.knobs)
        self.stats = Stats(config.role)
        identity = f"{config.host}:{config.port}"
        prefill = config.role == "prefill"
        self.registry = RoomRegistry(identity) if prefill else None
        self.client = None if prefill else BootstrapClient(identity)
        self.generator = Generator(
            config,
            self.stats,
            self.knobs,
            registry=self.registry,
            client=self.client,
            rng=rng or random.Random(),
        )
        self.listener: asyncio.AbstractServer | None = None
        self.started = time.time()
        self._running: dict[str, tuple[asyncio.Task[None], Exchange]] = {}
        self._routes: dict[str, Callable[[str, bytes, Send], Awaitable[None]]] = {
            "/health": self._health,
            "/health_generate": self._health,
            "/ready": self._health,
            "/model_info": self._model_info,
            "/get_model_info": self._model_info,
            "/server_info": self._server_info,
            "/get_server_info": self._server_info,
            "/v1/models": self._models,
            "/flush_cache": self._flush_cache,
            "/abort_request": self._abort,
            "/get_load": self._get_load,
            "/v1/loads": self._loads,
            "/_sim/stats": self._sim_stats,
            "/_sim/reset": self._sim_reset,
            "/_sim/knobs": self._sim_knobs,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        body = await _read_body(receive)
        if not path.startswith("/_sim/"):
            self.stats.request(path, scope["headers"], body)
        kind = _GENERATION_ROUTES.get(path)
        if kind is not None:
            if scope["method"] != "POST":
                await self._reply(send, 405, _NOT_ALLOWED)
                return
            await self._generate(kind, body, receive, send)
            return
        handler = self._routes.get(path)
        if handler is None:
            await self._reply(send, 404, _NOT_FOUND)
            return
        await handler(scope["method"], body, send)

    # -- generation ---------------------------------------------------------

    async def _generate(self, kind: Kind, body: bytes, receive: Receive, send: Send) -> None:
        arrival = time.monotonic()
        default_max = self.knobs.max_new_tokens_default
        try:
            req = (
                parse_generate(body, default_max)
                if kind == "generate"
                else parse_openai(kind, body, default_max)
            )
            self._check_bootstrap(req)
        except RequestError as exc:
            await self._reply(send, 400, formats.error_body(kind, str(exc), 400))
            return
        task = asyncio.current_task()
        assert task is not None
        ex = Exchange(send, self.stats)
        self.stats.enter()
        for item in req.items:
            self._running[item.rid] = (task, ex)
        watcher = asyncio.ensure_future(self._watch(receive, ex, task))
        try:
            await self.generator.run(req, ex, arrival)
        except asyncio.CancelledError:
            if not (ex.disconnected or ex.aborted):
                raise
            task.uncancel()
            if ex.aborted and not ex.disconnected:
                await self._answer_abort(req, ex)
        finally:
            ex.finished = True
            watcher.cancel()
            self.stats.leave()
            for item in req.items:
                if self._running.get(item.rid, (None, None))[1] is ex:
                    del self._running[item.rid]

    def _check_bootstrap(self, req: GenRequest) -> None:
        role = self.config.role
        for item in req.items:
            if item.room is None:
                raise RequestError(formats.missing_room_message(role))
            if role == "decode" and item.host is None:
                raise RequestError(f"Disaggregation mode {role} requires bootstrap_host")

    async def _watch(self, receive: Receive, ex: Exchange, task: asyncio.Task[None]) -> None:
        """Cancel the request as soon as its client goes away."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not ex.finished:
                    ex.disconnected = True
                    self.stats.client_disconnects += 1
                    task.cancel()
                return

    async def _answer_abort(self, req: GenRequest, ex: Exchange) -> None:
        reason = {"type": "abort", "message": "Abort request", "status_code": 200}
        if ex.started:
            await ex.event(
                formats.sse({"meta_info": {"id": req.items[0].rid, "finish_reason": reason}})
            )
            await ex.done()
            return
        if req.kind == "generate":
            results = [
                {
                    "text": "",
                    "output_ids": [],
                    "meta_info": {
                        "id": item.rid,
                        "finish_reason": reason,
                        "prompt_tokens": item.prompt_tokens,
                        "completion_tokens": 0,
                        "cached_tokens": 0,
                    },
                }
                for item in req.items
            ]
            await ex.complete(200, encode(results if req.batch else results[0]))
        else:
            await ex.complete(400, formats.error_body(req.kind, "Abort request", 400))

    # -- other endpoints ----------------------------------------------------

    async def _reply(
        self,
        send: Send,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] = JSON_HEADERS,
    ) -> None:
        self.stats.bytes_sent += len(body)
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _health(self, method: str, body: bytes, send: Send) -> None:
        await self._reply(send, 503 if self.knobs.health_fail else 200, b"", _TEXT_HEADERS)

    async def _model_info(self, method: str, body: bytes, send: Send) -> None:
        model = self.config.model
        await self._reply(
            send,
            200,
            encode(
                {
                    "model_path": model,
                    "tokenizer_path": model,
                    "is_generation": True,
                    "served_model_name": model,
                    "weight_version": "default",
                    "has_image_understanding": False,
                    "has_audio_understanding": False,
                    "model_type": "llama",
                    "architectures": ["LlamaForCausalLM"],
                }
            ),
        )

    async def _server_info(self, method: str, body: bytes, send: Send) -> None:
        config = self.config
        elapsed = max(time.time() - self.started, 1e-3)
        await self._reply(
            send,
            200,
            encode(
                {
                    "model_path": config.model,
                    "served_model_name": config.model,
                    "host": config.host,
                    "port": config.port,
                    "tp_size": 1,
                    "dp_size": 1,
                    "disaggregation_mode": config.role,
                    "disaggregation_bootstrap_port": config.bootstrap_port,
                    "disaggregation_transfer_backend": "simulated",
                    "version": "minilb-sim",
                    "internal_states": [
                        {
                            "last_gen_throughput": self.stats.tokens_generated / elapsed,
                            "avg_spec_accept_length": None,
                        }
                    ],
                }
            ),
        )

    async def _models(self, method: str, body: bytes, send: Send) -> None:
        model = self.config.model
        await self._reply(
            send,
            200,
            encode(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": model,
                            "object": "model",
                            "created": int(self.started),
                            "owned_by": "sglang",
                            "root": model,
                            "max_model_len": 32768,
                        }
                    ],
                }
            ),
        )

    async def _flush_cache(self, method: str, body: bytes, send: Send) -> None:
        # SGLang refuses to flush while requests run.
        await self._reply(send, 400 if self.stats.in_flight else 200, _FLUSH_TEXT, _TEXT_HEADERS)

    async def _abort(self, method: str, body: bytes, send: Send) -> None:
        try:
            view = msgspec.json.decode(body or b"{}", type=_AbortView)
        except msgspec.DecodeError as exc:
            await self._reply(send, 400, encode(formats.generate_error(str(exc))))
            return
        targets = (
            list(self._running.values())
            if view.abort_all
            else ([self._running[view.rid]] if view.rid in self._running else [])
        )
        for task, ex in targets:
            if not ex.finished and not ex.aborted:
                ex.aborted = True
                self.stats.aborted += 1
                task.cancel()
        await self._reply(send, 200, b"", _TEXT_HEADERS)

    async def _get_load(self, method: str, body: bytes, send: Send) -> None:
        await self._reply(
            send,
            200,
            encode(
                [
                    {
                        "dp_rank": 0,
                        "num_reqs": self.stats.in_flight,
                        "num_waiting_reqs": 0,
                        "num_tokens": 0,
                    }
                ]
            ),
        )

    async def _loads(self, method: str, body: bytes, send: Send) -> None:
        await self._reply(
            send,
            200,
            encode(
                {
                    "timestamp": time.time(),
                    "loads": [
                        {
                            "dp_rank": 0,
                            "num_running_reqs": self.stats.in_flight,
                            "num_waiting_reqs": 0,
                            "num_used_tokens": 0,
                            "token_usage": 0.0,
                        }
                    ],
                }
            ),
        )

    async def _sim_stats(self, method: str, body: bytes, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": encode(self.stats.snapshot())})

    async def _sim_reset(self, method: str, body: bytes, send: Send) -> None:
        if method != "POST":
            await self._reply(send, 405, _NOT_ALLOWED)
            return
        self.stats.reset()
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": b"{}"})

    async def _sim_knobs(self, method: str, body: bytes, send: Send) -> None:
        if method == "POST":
            try:
                new = update_knobs(self.knobs, body)
            except KnobsError as exc:
                await send({"type": "http.response.start", "status": 400, "headers": JSON_HEADERS})
                await send(
                    {"type": "http.response.body", "body": encode(formats.generate_error(str(exc)))}
                )
                return
            # Update in place: the generator and the listener hold this object.
            for name in new.__struct_fields__:
                setattr(self.knobs, name, getattr(new, name))
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": knobs_json(self.knobs)})

    # -- lifespan -------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except OSError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        if self.registry is not None:
            stats = self.stats

            def duplicated() -> None:
                stats.rooms_duplicated += 1

            self.listener = await start_listener(
                self.config.host,
                self.config.bootstrap_port,
                self.registry,
                lambda: self.knobs,
                duplicated,
            )

    async def shutdown(self) -> None:
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.listener.wait_closed(), 1.0)
        if self.client is not None:
            await self.client.close()


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


def create_sim_app(config: SimConfig, *, rng: random.Random | None = None) -> SimApp:
    """Build a simulator app for `config` (one role)."""
    return SimApp(config, rng=rng)
