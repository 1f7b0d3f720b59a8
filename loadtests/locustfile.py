"""Locust scenarios for minilb (or any SGLang PD balancer).

One user class per scenario; pick them by class name or by tag:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 GenerateStreamUser
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --tags stream

A stream counts as one request, timed until its last byte; the time to its
first data event is recorded as a second entry named "<name> TTFE".
Locust itself costs far more CPU per request than a balancer: use it for
behaviour under a realistic mix, and `scripts/bench_peers.py` (wrk) for
throughput and CPU figures.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from locust import FastHttpUser, between, tag, task
from locust.contrib.fasthttp import ResponseContextManager

_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
          "tired", "engineers", "watch")
_JSON = {"Content-Type": "application/json"}


def prompt(words: int, rng: random.Random) -> str:
    """A prompt of `words` words (the simulator counts one token per word)."""
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def generate_body(
    text: str | list[str], max_new_tokens: int, *, stream: bool = False, logprob: bool = False
) -> str:
    body: dict[str, Any] = {
        "text": text,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
        "stream": stream,
    }
    if logprob:
        body["return_logprob"] = True
        body["logprob_start_len"] = 0
    return json.dumps(body)


def chat_body(text: str, max_tokens: int, *, stream: bool = False) -> str:
    body: dict[str, Any] = {
        "model": "minilb-sim",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


def _stream_problem(data: bytes) -> str | None:
    """Why a finished SSE body is not a clean stream, or None."""
    if not data.rstrip().endswith(b"data: [DONE]"):
        return "stream did not end with data: [DONE]"
    if b'data: {"error"' in data or b'"type":"abort"' in data or b'"type": "abort"' in data:
        return "stream carried an error event"
    return None


class _PDUser(FastHttpUser):  # type: ignore[misc]
    """Shared helpers; concrete users below add one task each."""

    abstract = True
    wait_time = between(0, 0)
    rng = random.Random()

    def post_json(self, path: str, body: str, name: str) -> None:
        with self.client.post(
            path, data=body, headers=_JSON, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif not response.content or response.content[:1] not in (b"{", b"["):
                response.failure("body is not JSON")

    def post_stream(self, path: str, body: str, name: str) -> None:
        """One streamed request: timed to its end, plus a "<name> TTFE" entry."""
        started = time.perf_counter()
        with self.client.post(
            path, data=body, headers=_JSON, name=name, stream=True, catch_response=True
        ) as response:
            self._consume_stream(response, name, started)

    def _consume_stream(self, response: ResponseContextManager, name: str, started: float) -> None:
        if response.status_code != 200:
            response.failure(f"status {response.status_code}")
            return
        chunks: list[bytes] = []
        first_event: float | None = None
        # geventhttpclient's read(n) waits for n bytes; readline returns each event as it lands.
        raw = response._response
        if raw is None:
            response.failure("no response")
            return
        try:
            while event := raw.readline(b"\n\n"):
                if first_event is None and event.startswith(b"data:"):
                    first_event = time.perf_counter()
                chunks.append(event)
            chunks.append(raw.read())  # anything after the last blank line
        except Exception as exc:  # a reset mid-stream: a failed request, not a crash
            response.failure(f"stream broke: {exc!r}")
            return
        finished = time.perf_counter()
        data = b"".join(chunks)
        response.request_meta["response_time"] = (finished - started) * 1000
        response.request_meta["response_length"] = len(data)
        if first_event is not None:
            self.environment.events.request.fire(
                request_type="POST",
                name=f"{name} TTFE",
                response_time=(first_event - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
        problem = _stream_problem(data)
        if problem is None:
            response.success()
        else:
            response.failure(problem)


class GenerateUser(_PDUser):
    """Non-stream /generate, a short prompt, 16 new tokens."""

    @tag("generate", "nonstream")
    @task
    def generate(self) -> None:
        self.post_json("/generate", generate_body(prompt(16, self.rng), 16), "generate")


class GenerateStreamUser(_PDUser):
    """Streaming /generate, 50 events per response."""

    @tag("generate", "stream")
    @task
    def generate_stream(self) -> None:
        body = generate_body(prompt(16, self.rng), 50, stream=True)
        self.post_stream("/generate", body, "generate stream")


class ChatUser(_PDUser):
    """Non-stream /v1/chat/completions."""

    @tag("chat", "nonstream")
    @task
    def chat(self) -> None:
        self.post_json("/v1/chat/completions", chat_body(prompt(24, self.rng), 32), "chat")


class ChatStreamUser(_PDUser):
    """Streaming /v1/chat/completions with a usage chunk."""

    @tag("chat", "stream")
    @task
    def chat_stream(self) -> None:
        body = chat_body(prompt(24, self.rng), 32, stream=True)
        self.post_stream("/v1/chat/completions", body, "chat stream")


class BatchUser(_PDUser):
    """A /generate batch of 8 prompts (one room per item)."""

    @tag("generate", "batch", "nonstream")
    @task
    def batch(self) -> None:
        texts = [prompt(12, self.rng) for _ in range(8)]
        self.post_json("/generate", generate_body(texts, 16), "generate batch")


class MixUser(_PDUser):
    """A realistic mix: mostly streams, varied prompt and output lengths, some logprobs."""

    wait_time = between(0.0, 0.05)

    def _lengths(self) -> tuple[int, int]:
        prompt_words = int(self.rng.lognormvariate(4.0, 1.0)) + 1  # median ~55, long tail
        return min(prompt_words, 4000), self.rng.choice((8, 32, 64, 128, 256))

    @tag("mix", "stream")
    @task(5)
    def mix_generate_stream(self) -> None:
        words, new = self._lengths()
        logprob = self.rng.random() < 0.2
        body = generate_body(prompt(words, self.rng), new, stream=True, logprob=logprob)
        self.post_stream("/generate", body, "mix generate stream")

    @tag("mix", "nonstream")
    @task(2)
    def mix_generate(self) -> None:
        words, new = self._lengths()
        logprob = self.rng.random() < 0.2
        body = generate_body(prompt(words, self.rng), new, logprob=logprob)
        self.post_json("/generate", body, "mix generate")

    @tag("mix", "stream")
    @task(2)
    def mix_chat_stream(self) -> None:
        words, new = self._lengths()
        self.post_stream("/v1/chat/completions", chat_body(prompt(words, self.rng), new, stream=True),
                         "mix chat stream")

    @tag("mix", "nonstream")
    @task(1)
    def mix_chat(self) -> None:
        words, new = self._lengths()
        self.post_json("/v1/chat/completions", chat_body(prompt(words, self.rng), new), "mix chat")

    @tag("mix", "batch")
    @task(1)
    def mix_batch(self) -> None:
        size = self.rng.randint(2, 16)
        texts = [prompt(self._lengths()[0], self.rng) for _ in range(size)]
        body = generate_body(texts, self.rng.choice((8, 32)), logprob=self.rng.random() < 0.2)
        self.post_json("/generate", body, "mix generate batch")
