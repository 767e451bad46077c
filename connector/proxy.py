"""Rootless outbound for other processes: one 127.0.0.1 port speaking SOCKS5 and HTTP proxy.

Without the root daemon nothing routes the machine's traffic into the cluster;
instead the connector serves a proxy that processes opt into with the usual
variables (`tpnb connect --no-root` exports or prints them):

    ALL_PROXY=socks5h://tpnb:TOKEN@127.0.0.1:PORT      (socks5h: the proxy resolves names)
    HTTP_PROXY=HTTPS_PROXY=http://tpnb:TOKEN@127.0.0.1:PORT
    NO_PROXY=localhost,127.0.0.1,::1

The first byte of a connection picks the protocol: 0x05 is SOCKS5 (RFC 1928,
CONNECT only, with username/password auth, RFC 1929; addresses as IPv4, IPv6
or a name resolved here), anything else is HTTP/1.1: `CONNECT host:port`, or
an absolute-form request (`GET http://hello.default/ HTTP/1.1`, what curl and
requests send for http:// URLs through HTTP_PROXY), whose head is rewritten to
origin-form and passed on, after which the connection is a byte pipe to that
host (later requests on a kept-alive connection go to the same host, in
absolute form, which RFC 9112 obliges servers to accept).

Where a connection goes: a cluster name (connector/clusterdns.py) or an
address in the cluster's subnets (or `--also-proxy`) through the manager,
like every other tunnel; anything else directly from the connector, as the
process would have without the proxy.  UDP (SOCKS UDP ASSOCIATE) and BIND are
refused.

The port is on loopback, where any local user could reach it, so every
request must carry the session's random token (SOCKS5 username/password,
HTTP `Proxy-Authorization: Basic`); without it SOCKS5 fails the
authentication and HTTP answers 407.

Hand-written rather than a library: the proxy servers on PyPI (pproxy,
asyncio-socks-server, proxy.py) dial with the OS's sockets and resolver and
offer no hook for "open this connection through a gRPC tunnel and resolve
this name through the cluster", which is the whole job here; the protocol
part is about 150 lines of two stable, small RFCs.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol
from urllib.parse import urlsplit

from tpnb.common.aio import oserror_text
from tpnb.common.forward import STREAM_LIMIT

log = logging.getLogger("tpnb.connector.proxy")

USER = "tpnb"
HEAD_LIMIT = 64 * 1024


class Refused(Exception):
    """The destination cannot be reached (the text says why); `code`: SOCKS5 reply code."""

    def __init__(self, why: str, code: int = 5) -> None:
        super().__init__(why)
        self.code = code


#: (ip, port) -> an open path to it: a coroutine taking the client's reader/writer and
#: bytes to send first, which pumps until both directions end
Pipe = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


@dataclass
class Route:
    """How the proxy reaches destinations: `tunnel(ip, port)` opens a path through the
    cluster (raises Refused); `resolve(name)` is the cluster's answer (None: no cluster name);
    `in_cluster(ip)` whether an address is to be tunnelled."""

    tunnel: Callable[[str, int], Awaitable[Pipe]]
    resolve: Callable[[str], Awaitable[list[str] | None]]
    in_cluster: Callable[[str], bool]


class OutboundProxy:
    def __init__(self, route: Route, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.route, self.token, self.host, self.port = route, token, host, port
        self._server: asyncio.Server | None = None
        self.stats = {"socks": 0, "http": 0, "tunnelled": 0, "direct": 0, "refused": 0}

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("SOCKS5 + HTTP proxy on %s:%d", self.host, self.port)
        return self.port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def urls(self) -> dict[str, str]:
        cred = f"{USER}:{self.token}@{self.host}:{self.port}"
        return {"socks": f"socks5h://{cred}", "http": f"http://{cred}"}

    # ------------------------------------------------------------ one connection
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(reader.readexactly(1), 30)
            if first == b"\x05":
                self.stats["socks"] += 1
                await self._socks(reader, writer)
            else:
                self.stats["http"] += 1
                await self._http(first, reader, writer)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
            log.debug("proxy client went away: %s", exc)
        except Exception:  # noqa: BLE001 - one bad client never stops the proxy
            log.exception("proxy connection failed")
        finally:
            if not writer.is_closing():
                writer.close()

    def _token_ok(self, user: str, password: str) -> bool:
        return user == USER and hmac.compare_digest(password.encode(), self.token.encode())

    async def _open(self, host: str, port: int) -> tuple[Pipe, str]:
        """A path to host:port and a description of it ("cluster 10.43.0.10" / "direct")."""
        if not 0 < port < 65536:
            raise Refused(f"bad port {port}", 1)
        try:
            ipaddress.ip_address(host)
            ips: list[str] | None = [host] if self.route.in_cluster(host) else None
        except ValueError:
            try:
                ips = await self.route.resolve(host)
            except LookupError as exc:
                raise Refused(str(exc), 4) from None
            if ips is not None and not ips:
                raise Refused(f"{host}: the cluster has no such name", 4)
        if ips:
            self.stats["tunnelled"] += 1
            return await self.route.tunnel(ips[0], port), f"cluster {ips[0]}"
        self.stats["direct"] += 1
        return await _direct(host, port), "direct"

    # ------------------------------------------------------------ SOCKS5
    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = (await reader.readexactly(1))[0]
        methods = await reader.readexactly(n)
        if 2 not in methods:
            writer.write(b"\x05\xff")  # no acceptable method: this proxy needs the token
            await writer.drain()
            log.info("SOCKS5 client offered no username/password authentication: refused")
            return
        writer.write(b"\x05\x02")
        ver, ulen = await reader.readexactly(2)
        user = (await reader.readexactly(ulen)).decode("utf-8", "replace")
        plen = (await reader.readexactly(1))[0]
        password = (await reader.readexactly(plen)).decode("utf-8", "replace")
        if ver != 1 or not self._token_ok(user, password):
            writer.write(b"\x01\x01")
            await writer.drain()
            self.stats["refused"] += 1
            log.info("SOCKS5 client with a wrong token: refused")
            return
        writer.write(b"\x01\x00")
        ver, cmd, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        elif atyp == 3:
            ln = (await reader.readexactly(1))[0]
            host = (await reader.readexactly(ln)).decode("idna")
        else:
            return await _socks_reply(writer, 8)
        port = struct.unpack("!H", await reader.readexactly(2))[0]
        if cmd != 1:  # CONNECT only
            return await _socks_reply(writer, 7)
        try:
            pipe, how = await self._open(host, port)
        except Refused as exc:
            self.stats["refused"] += 1
            log.info("SOCKS5 %s:%d refused: %s", host, port, exc)
            return await _socks_reply(writer, exc.code)
        log.debug("SOCKS5 %s:%d via %s", host, port, how)
        await _socks_reply(writer, 0)
        await pipe(reader, writer, b"")

    # ------------------------------------------------------------ HTTP
    async def _http(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = first + await reader.readuntil(b"\r\n\r\n")
        if len(head) > HEAD_LIMIT:
            return await _http_error(writer, 431, "request head too large")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            return await _http_error(writer, 400, "not an HTTP request")
        headers = [ln for ln in lines[1:] if ln]
        auth = next((ln.split(":", 1)[1].strip() for ln in headers
                     if ln.lower().startswith("proxy-authorization:")), "")
        if not self._basic_ok(auth):
            self.stats["refused"] += 1
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"tpnb\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        keep = [ln for ln in headers if not ln.lower().startswith(("proxy-authorization:", "proxy-connection:"))]
        if method.upper() == "CONNECT":
            host, port = _split_hostport(target, 443)
            try:
                pipe, how = await self._open(host, port)
            except Refused as exc:
                self.stats["refused"] += 1
                return await _http_error(writer, 502, f"{host}:{port}: {exc}")
            log.debug("CONNECT %s:%d via %s", host, port, how)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            return await pipe(reader, writer, b"")
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            return await _http_error(writer, 400, f"cannot proxy {target!r}: only http:// URLs and CONNECT")
        port = url.port or 80
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        out = "\r\n".join([f"{method} {path} {version}", *keep]) + "\r\n\r\n"
        try:
            pipe, how = await self._open(url.hostname, port)
        except Refused as exc:
            self.stats["refused"] += 1
            return await _http_error(writer, 502, f"{url.hostname}:{port}: {exc}")
        log.debug("%s %s via %s", method, target, how)
        await pipe(reader, writer, out.encode("latin-1"))

    def _basic_ok(self, value: str) -> bool:
        scheme, _, cred = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(cred.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return self._token_ok(user, password)


def _split_hostport(target: str, default: int) -> tuple[str, int]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, _, port = target.rpartition(":")
    if not host:
        return target, default
    try:
        return host, int(port)
    except ValueError:
        return target, default


async def _socks_reply(writer: asyncio.StreamWriter, code: int) -> None:
    writer.write(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    await writer.drain()


async def _http_error(writer: asyncio.StreamWriter, status: int, why: str) -> None:
    reason = {400: "Bad Request", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}.get(status, "Error")
    body = f"tpnb proxy: {why}\n".encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    await writer.drain()


class SocketRelay(Protocol):
    """A dialled connection that pumps a plain socket itself (connector/direct.py `DirectConn`)."""

    async def relay(self, sock: socket.socket, early: bytes = b"") -> None: ...

    def abort(self) -> None: ...


def direct_pipe(conn: SocketRelay) -> Pipe:
    """A pipe over the direct data plane: the client's socket leaves asyncio's streams and is
    relayed by `conn` itself (no stream-buffer copies on the path)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        try:
            sock, buffered = await detach(reader, writer)
        except (OSError, RuntimeError) as exc:
            conn.abort()
            log.debug("proxy client gone before the direct relay: %s", exc)
            return
        await conn.relay(sock, head + buffered)

    return pipe


async def detach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[socket.socket, bytes]:
    """Take the client's socket out of its asyncio transport: (a duplicate of it, the bytes
    the stream had read ahead).  What we wrote (a SOCKS reply) is flushed first."""
    await writer.drain()
    transport = writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    raw = transport.get_extra_info("socket")
    if raw is None:
        raise RuntimeError("the client's transport has no socket")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    buffered = bytes(reader._buffer)  # noqa: SLF001 - read ahead by the stream, still the client's
    reader._buffer.clear()  # noqa: SLF001
    transport.abort()  # closes the transport's descriptor only; ours keeps the connection
    return sock, buffered


async def _direct(host: str, port: int) -> Pipe:
    """host:port the ordinary way, as the client would have without the proxy."""
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=STREAM_LIMIT), 10)
    except asyncio.TimeoutError:
        raise Refused(f"{host}:{port}: timed out", 4) from None
    except OSError as exc:
        raise Refused(f"{host}:{port}: {oserror_text(exc)}", 5) from None

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        if first:
            up_w.write(first)
        await asyncio.gather(_copy(reader, up_w), _copy(up_r, writer), return_exceptions=True)
        up_w.close()

    return pipe


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(STREAM_LIMIT):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()

