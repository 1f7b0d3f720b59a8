"""The quick start's requests against a running minilb, with httpx and with the OpenAI SDK.

    minilb demo &            # or any minilb in front of real servers
    python scripts/example_client.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json

import httpx


def with_httpx(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        print("health:", client.get("/health").status_code)
        r = client.post(
            "/generate",
            json={"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}},
        )
        print("generate:", r.json()["text"])
        chat = {"model": "default", "messages": [{"role": "user", "content": "Hello!"}]}
        r = client.post("/v1/chat/completions", json=chat)
        print("chat:", r.json()["choices"][0]["message"]["content"])
        print("streaming chat:", end=" ", flush=True)
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        print(choice["delta"].get("content") or "", end="", flush=True)
        print()


def with_openai(url: str) -> None:
    try:
        import openai
    except ImportError:
        print("openai is not installed; pip install openai")
        return
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    messages = [{"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=8)  # type: ignore[arg-type]
    print("openai chat:", reply.choices[0].message.content)
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=8, stream=True  # type: ignore[arg-type]
    )
    print("openai streaming chat:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    completion = client.completions.create(model="default", prompt="Once upon a time", max_tokens=8)
    print("openai completion:", completion.choices[0].text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    with_httpx(args.url)
    with_openai(args.url)


if __name__ == "__main__":
    main()
