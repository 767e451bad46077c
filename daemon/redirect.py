"""Kernel TCP for cluster-bound connections: nftables REDIRECT + SO_ORIGINAL_DST.

Why: the TUN engine terminates TCP in user space, which costs about 4x in
bulk throughput against the kernel's own TCP stack (shared/notes/tun-engine.md),
and the daemon is CPU-bound at bulk rates.  So when `nft` is usable, TCP
connections that local processes open to a cluster subnet are redirected by
a NAT rule in the OUTPUT hook to one listening socket of the daemon; the
kernel finishes the handshake, and ``SO_ORIGINAL_DST`` on the accepted socket
tells which cluster address the client dialled.  The routes through the TUN
device stay (without a route the client's connect() would fail before the
NAT hook runs), and the TUN still carries UDP, DNS, and TCP forwarded from
other namespaces (containers), which the OUTPUT hook does not see.

A plus over the TUN: a refused dial can be answered with a reset.

Everything lives in one nftables table named after the TUN device; deleting
the table undoes it all, so crash recovery (`netstate.recover`) just deletes
it, and stale tables of dead daemons are found by their name prefix.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Literal

from tpnb.common.forward import SocketStream
from tpnb.errors import PrerequisiteError

log = logging.getLogger(__name__)

#: <linux/netfilter_ipv4.h>
SO_ORIGINAL_DST = 80


class SocketFlow(SocketStream):
    """One redirected TCP connection: a `SocketStream` with the `tun.Flow` surface.

    ``src`` is the local client, ``dst`` the cluster address it dialled
    (from ``SO_ORIGINAL_DST``).  The tunnel pumps take it as both their
    reader and writer.
    """

    protocol: Literal["tcp"] = "tcp"

    def __init__(self, sock: socket.socket, src: tuple[str, int], dst: tuple[str, int]) -> None:
        super().__init__(sock)
        self.src = src
        self.dst = dst

    @property
    def reader(self) -> SocketFlow:
        return self

    @property
    def writer(self) -> SocketFlow:
        return self

    def refuse(self) -> None:
        """End the connection with a reset (the dial on the cluster side failed)."""
        self.abort()


FlowHandler = Callable[[SocketFlow], Awaitable[None]]


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The (address, port) a redirected IPv4 connection was originally sent to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def nft_available() -> str | None:
    """Why the kernel path cannot be used here, or None when it can be tried."""
    if shutil.which("nft") is None:
        return "the `nft` command is not installed (Debian/Ubuntu: apt-get install nftables)"
    return None


async def _nft(*args: str, stdin: str | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "nft", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    return proc.returncode or 0, out.decode("utf-8", "replace").strip()


def ruleset(table: str, cidrs: list[str], port: int) -> str:
    """The nftables script that creates `table` (replacing any previous one)."""
    elements = ", ".join(cidrs)
    return (
        f"table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        f"  set cluster {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {elements} }} }}\n"
        f"  chain output {{\n"
        f"    type nat hook output priority -100; policy accept;\n"
        f"    meta l4proto tcp ip daddr @cluster redirect to :{port}\n"
        f"  }}\n"
        f"}}\n"
    )


async def delete_table(table: str) -> bool:
    """Remove our table; True when it existed."""
    if shutil.which("nft") is None:
        return False
    rc, _ = await _nft("delete", "table", "ip", table)
    return rc == 0


async def cleanup_stale(prefix: str = "tpnb") -> list[str]:
    """Delete leftover ``ip <prefix>*`` tables (a daemon killed without its record)."""
    if shutil.which("nft") is None:
        return []
    rc, out = await _nft("list", "tables", "ip")
    if rc != 0:
        return []
    gone = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[:2] == ["table", "ip"] and parts[2].startswith(prefix):
            if await delete_table(parts[2]):
                gone.append(f"nft table ip {parts[2]}")
    return gone


class KernelTcp:
    """Accepts redirected connections and hands each to ``on_tcp`` as a `SocketFlow`.

    ``async with KernelTcp(table, on_tcp) as k: await k.redirect(cidrs)``.
    Leaving the block deletes the table first (new connections go back to
    the TUN route), then cancels the running handlers.
    """

    def __init__(self, table: str, on_tcp: FlowHandler) -> None:
        self.table = table
        self.on_tcp = on_tcp
        self.port = 0
        self.cidrs: list[str] = []
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._installed = False

    async def __aenter__(self) -> KernelTcp:
        why = nft_available()
        if why:
            raise PrerequisiteError("kernel TCP path unavailable", why, "or set daemon.tcp_engine to tun")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(), name="kernel-tcp accept")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def redirect(self, cidrs: list[str]) -> None:
        """Send new TCP connections to ``cidrs`` (IPv4 only; others stay on the TUN) here."""
        nets = [n for n in (ipaddress.ip_network(c, strict=False) for c in cidrs) if n.version == 4]
        if not nets:
            return
        v4 = [str(n) for n in nets]
        self._installed = True  # intent first: aclose() deletes even a half-made table
        rc, out = await _nft("-f", "-", stdin=ruleset(self.table, v4, self.port))
        if rc != 0:
            await delete_table(self.table)
            self._installed = False
            raise PrerequisiteError("cannot install the nftables redirect", out or f"nft exited {rc}",
                                    "check that the kernel has nf_tables/nft_redirect, "
                                    "or set daemon.tcp_engine to tun")
        self.cidrs = v4
        self._nets = nets
        log.info("kernel TCP: %s redirected to 127.0.0.1:%d (nft table ip %s)", ", ".join(v4), self.port, self.table)

    @property
    def active_flows(self) -> int:
        return sum(1 for t in self._tasks if not t.done())

    async def aclose(self) -> None:
        if self._installed:
            await delete_table(self.table)
            self._installed = False
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    async def _accept_loop(self) -> None:
        """Accept from a reader callback, every pending connection at once, and start each
        handler eagerly: the flow's `open` frame is on its way before the loop turns again
        (`sock_accept` + `create_task` cost two more turns of the loop per connection)."""
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None
        failed: asyncio.Future[OSError] = loop.create_future()

        def readable() -> None:
            while True:
                try:
                    conn, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if not failed.done():
                        failed.set_result(exc)
                    return
                task = asyncio.eager_task_factory(loop, self._accepted(conn, (peer[0], peer[1])))
                if not task.done():
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

        while True:
            loop.add_reader(listener.fileno(), readable)
            try:
                exc = await failed
            finally:
                loop.remove_reader(listener.fileno())
            log.warning("kernel TCP: accept failed: %s", exc)
            failed = loop.create_future()
            await asyncio.sleep(0.1)

    async def _accepted(self, sock: socket.socket, src: tuple[str, int]) -> None:
        try:
            dst = original_dst(sock)
        except OSError as exc:
            log.warning("redirected connection without an original destination dropped: %s", exc)
            sock.close()
            return
        if not any(ipaddress.ip_address(dst[0]) in n for n in self._nets):
            # a direct connection to the listener, not a redirected one
            log.warning("connection from %s:%d to the redirect port itself refused", *src)
            sock.close()
            return
        flow = SocketFlow(sock, src, dst)
        try:
            await self.on_tcp(flow)
        except asyncio.CancelledError:
            flow.refuse()
            raise
        except Exception:
            log.exception("tcp flow %s:%d -> %s:%d: handler failed", *src, *dst)
        finally:
            flow.close()
