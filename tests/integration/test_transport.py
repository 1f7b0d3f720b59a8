"""The lean transport against real sockets: framing, keep-alive, flow control, failures."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvloop

from minilb.transport import LeanTransport


async def serve(handler: object) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def shut(server: asyncio.Server) -> None:
    await asyncio.sleep(0.1)  # let handlers see their client go and close their side
    server.close()
    await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def test_body_ended_by_close_chunked_and_keep_alive() -> None:
    async def main() -> None:
        connections = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while True:
                try:
                    request = await read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                if b"/close" in request:
                    writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
                    await writer.drain()
                    break
                if b"/chunked" in request:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server, url = await serve(handler)
        transport = LeanTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            r = await client.post(f"{url}/x", content=b"{}")
            assert (r.status_code, r.text) == (201, "ok")
            r = await client.get(f"{url}/chunked")
            assert r.text == "hello world"
            assert connections == 1  # both on one keep-alive connection
            r = await client.get(f"{url}/close")
            assert r.text == "until the end"
            r = await client.post(f"{url}/x", content=b"{}")
            assert r.status_code == 201 and connections == 2
        assert transport.open_connections == 0
        await shut(server)

    asyncio.run(main())


def test_connection_errors_are_httpx_errors() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server, url = await serve(handler)
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            with pytest.raises(httpx.ReadError):
                await client.get(f"{url}/truncated")
            await shut(server)
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{url}/gone")

    asyncio.run(main())


def test_a_slow_reader_stops_the_socket_reads() -> None:
    async def main() -> None:
        sent = 0
        blocked = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            piece = b"x" * 65536
            try:
                for _ in range(2000):  # 128 MiB if nothing pushed back
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    try:
                        await asyncio.wait_for(writer.drain(), 0.5)
                    except TimeoutError:
                        blocked.set()
                        return
                    sent += len(piece)
            finally:
                writer.close()

        server, url = await serve(handler)
        transport = LeanTransport()
        request = httpx.Request("GET", f"{url}/big")
        response = await transport.handle_async_request(request)
        await asyncio.wait_for(blocked.wait(), 10)
        # The transport buffers at most its high-water mark; the kernel holds the rest.
        assert sent < 32 * 1024 * 1024
        await response.aclose()
        await transport.aclose()
        await shut(server)

    asyncio.run(main())


async def _paced_server(pieces: list[bytes], gap: float) -> tuple[asyncio.Server, str, list[int]]:
    """A server answering each request with `pieces` as chunks, `gap` seconds apart."""
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i, piece in enumerate(pieces):
                    if i:
                        await asyncio.sleep(gap)
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server, url = await serve(handler)
    return server, url, connections


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_read_with_not_before_gathers_the_pieces_behind_it(loop_kind: str) -> None:
    """Both loops must read the socket before the held reader wakes (see _end_hold)."""

    async def main() -> None:
        pieces = [b"data: %d\n\n" % i for i in range(6)]
        server, url, connections = await _paced_server(pieces, gap=0.01)
        transport = LeanTransport()
        loop = asyncio.get_running_loop()
        for _ in range(2):  # the second time on the same connection, kept alive across the hold
            response = await transport.send_raw(httpx.URL(f"{url}/s"), b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
            assert await response.read() == pieces[0]
            # Without a hold the next read returns the next piece alone ...
            assert await response.read() == pieces[1]
            # ... with one, it returns every piece sent within the hold (40 ms of 300).
            assert await response.read(loop.time() + 0.3) == b"".join(pieces[2:])
            assert await response.read(loop.time() + 0.3) == b""
            await response.stream.aclose()
        assert len(connections) == 1
        await transport.aclose()
        await shut(server)

    (uvloop.run if loop_kind == "uvloop" else asyncio.run)(main())


def test_a_read_cancelled_in_its_hold_resumes_reading() -> None:
    async def main() -> None:
        pieces = [b"data: %d\n\n" % i for i in range(4)]
        server, url, connections = await _paced_server(pieces, gap=0.05)
        transport = LeanTransport()
        loop = asyncio.get_running_loop()
        response = await transport.send_raw(httpx.URL(f"{url}/s"), b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
        assert await response.read() == pieces[0]
        reading = asyncio.ensure_future(response.read(loop.time() + 5))
        await asyncio.sleep(0.1)  # piece 1 is in; the read holds for the rest
        assert not reading.done()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        # The socket is read again: the rest arrives, and the connection is kept alive.
        rest = b""
        while chunk := await asyncio.wait_for(response.read(), 5):
            rest += chunk
        assert rest == b"".join(pieces[1:])
        await response.stream.aclose()
        response = await transport.send_raw(httpx.URL(f"{url}/s"), b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
        assert await response.read() == pieces[0]
        await response.stream.aclose()
        assert len(connections) == 1
        await transport.aclose()
        await shut(server)

    asyncio.run(main())
