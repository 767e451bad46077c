"""The daemon -> connector hand-off of redirected TCP (common/handoff.py, daemon/ and connector/handoff.py).

Real sockets throughout: a loopback TCP connection plays the redirected
client, the daemon's `HandoffClient` and the connector's `HandoffServer` talk
over a real SOCK_SEQPACKET socket in a temporary directory, and the
connector's "direct plane" is a stand-in dial that answers per port: relay
(an upper-casing echo), not mine, or refused.  What is asserted is what the
client program sees (its bytes, a reset) and what the trust checks let through.
"""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
from pathlib import Path

import pytest

from tpnb import render
from tpnb.api import DataPlane, Status
from tpnb.common import handoff as wire
from tpnb.common.handoff import HandoffProtocolError
from tpnb.connector import handoff as chandoff
from tpnb.connector.handoff import HandoffServer
from tpnb.daemon.handoff import LOST, HandoffClient

pytestmark = pytest.mark.unit

RELAY_PORT, NOT_MINE_PORT, REFUSED_PORT, SLOW_PORT = 8001, 8002, 8003, 8004


class PodRefused(ConnectionRefusedError):
    pass


class UpperEcho:
    """Stands in for `DirectConn`: answers each chunk upper-cased, half-closes after the client."""

    async def relay(self, sock: socket.socket, early: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            if early:
                await loop.sock_sendall(sock, early.upper())
            while data := await loop.sock_recv(sock, 65536):
                await loop.sock_sendall(sock, data.upper())
            sock.shutdown(socket.SHUT_WR)
        finally:
            sock.close()


class Plane:
    def __init__(self) -> None:
        self.dials: list[tuple[str, int]] = []
        self.release = asyncio.Event()

    async def dial(self, ip: str, port: int) -> UpperEcho | None:
        self.dials.append((ip, port))
        if port == RELAY_PORT:
            return UpperEcho()
        if port == REFUSED_PORT:
            raise PodRefused("connection refused by the pod")
        if port == SLOW_PORT:
            await self.release.wait()
        return None


async def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(client, accepted): a real loopback TCP connection, as the daemon's accept gives it."""
    loop = asyncio.get_running_loop()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    lst.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, lst.getsockname())
    accepted, _ = await loop.sock_accept(lst)
    lst.close()
    return client, accepted


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    async with asyncio.timeout(5):
        while data := await loop.sock_recv(sock, 65536):
            out += data
    return out


async def _linked(tmp_path: Path) -> tuple[Plane, HandoffServer, HandoffClient]:
    plane = Plane()
    server = HandoffServer(plane.dial, (PodRefused,), tmp_path)
    await server.start()
    client = HandoffClient(str(server.path), server.secret, os.getpid(), os.getuid())
    client.start()
    async with asyncio.timeout(5):
        while not client.ready:
            await asyncio.sleep(0.01)
    return plane, server, client


# ---------------------------------------------------------------- framing
def test_messages_round_trip() -> None:
    msgs = [wire.Hello(wire.VERSION, os.urandom(32)), wire.Ready(),
            wire.Offer(7, ("10.43.0.10", 80), ("127.0.0.1", 40000), b"GET / HTTP/1.1\r\n"),
            wire.Offer(2**32 - 1, ("fd00::1", 443), ("::1", 1), b""),
            wire.Answer(7, wire.REFUSED, "connection refused")]
    for m in msgs:
        assert wire.decode(wire.encode(m)) == m


@pytest.mark.parametrize("rec, why", [
    (b"", "empty"),
    (b"\x09", "unknown record type"),
    (bytes([wire.ANSWER, 0, 0, 0, 1, 9]), "unknown verdict"),
    (bytes([wire.OFFER, 0, 0]), "short record"),
    (struct.pack("!BIHHBB", wire.OFFER, 1, 80, 1, 4, 4) + b"\x0a\x2b", "truncated"),
    (struct.pack("!BIHHBB", wire.OFFER, 1, 80, 1, 3, 4) + b"\x0a\x2b\x00\x7f\x00\x00\x01", "address of 3"),
    (bytes([wire.READY, 1]), "unknown record type"),
])
def test_bad_records_are_errors_not_tracebacks(rec: bytes, why: str) -> None:
    with pytest.raises(HandoffProtocolError, match=why):
        wire.decode(rec)


def test_secret_check() -> None:
    s = os.urandom(32)
    assert wire.secret_ok(s, s)
    assert not wire.secret_ok(s, s[:-1] + bytes([s[-1] ^ 1]))
    assert not wire.secret_ok(b"", b"")  # no secret configured: nobody gets in


# ---------------------------------------------------------------- the three verdicts, as the client sees them
def test_taken_connection_is_relayed_by_the_connector(tmp_path: Path) -> None:
    async def main() -> None:
        plane, server, client = await _linked(tmp_path)
        try:
            user, accepted = await _tcp_pair()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(user, b"hello pod")
            verdict, _ = await client.offer(accepted, ("10.43.0.10", RELAY_PORT), ("127.0.0.1", 5555))
            assert verdict == wire.TAKEN
            accepted.close()  # the daemon drops its copy: the connection lives on in the connector
            await loop.sock_sendall(user, b", again")
            user.shutdown(socket.SHUT_WR)
            assert await _read_all(user) == b"HELLO POD, AGAIN"
            assert plane.dials == [("10.43.0.10", RELAY_PORT)]
            assert client.status().taken == 1 and server.counts["taken"] == 1
            user.close()
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(main())


def test_not_mine_leaves_the_connection_with_the_daemon(tmp_path: Path) -> None:
    async def main() -> None:
        _, server, client = await _linked(tmp_path)
        try:
            user, accepted = await _tcp_pair()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(user, b"ping")
            verdict, _ = await client.offer(accepted, ("10.42.0.9", NOT_MINE_PORT), ("127.0.0.1", 5555))
            assert verdict == wire.NOT_MINE
            # the connector neither read nor closed it: the daemon's copy still carries the flow
            accepted.setblocking(False)
            assert await loop.sock_recv(accepted, 10) == b"ping"
            await loop.sock_sendall(accepted, b"pong from the manager path")
            accepted.close()
            assert await _read_all(user) == b"pong from the manager path"
            assert client.status().not_mine == 1
            user.close()
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(main())


def test_refused_dial_resets_the_client(tmp_path: Path) -> None:
    async def main() -> None:
        _, server, client = await _linked(tmp_path)
        try:
            user, accepted = await _tcp_pair()
            verdict, why = await client.offer(accepted, ("10.42.0.9", REFUSED_PORT), ("127.0.0.1", 5555))
            assert verdict == wire.REFUSED and "refused" in why
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            accepted.close()  # what SocketFlow.refuse does: the connector already closed its copy
            with pytest.raises(ConnectionResetError):
                await _read_all(user)
            user.close()
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(main())


def test_early_bytes_ride_in_the_offer(tmp_path: Path) -> None:
    async def main() -> None:
        _, server, client = await _linked(tmp_path)
        try:
            user, accepted = await _tcp_pair()
            link = client.link
            assert link is not None
            ident = 99
            fut = asyncio.get_running_loop().create_future()
            client._pending[ident] = fut
            await link.send(wire.Offer(ident, ("10.43.0.10", RELAY_PORT), ("127.0.0.1", 1), b"early "),
                            [accepted.fileno()])
            assert (await asyncio.wait_for(fut, 5))[0] == wire.TAKEN
            accepted.close()
            user.shutdown(socket.SHUT_WR)
            assert await _read_all(user) == b"EARLY "
            user.close()
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------- trust
def test_socket_is_private_and_named_after_the_connector(tmp_path: Path) -> None:
    async def main() -> None:
        server = HandoffServer(Plane().dial, (PodRefused,), tmp_path / "rt")
        await server.start()
        try:
            assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
            assert server.path.name == f"handoff-{os.getpid()}.sock"
        finally:
            await server.aclose()
        assert not server.path.exists()

    asyncio.run(main())


def test_stale_socket_of_a_dead_connector_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / "handoff-999999999.sock"
    dead.touch()
    mine_alive = tmp_path / f"handoff-{os.getppid()}.sock"  # a live process's socket stays
    mine_alive.touch()

    async def main() -> None:
        server = HandoffServer(Plane().dial, (PodRefused,), tmp_path)
        await server.start()
        await server.aclose()

    asyncio.run(main())
    assert not dead.exists() and mine_alive.exists()


def test_daemon_refuses_a_listener_that_is_not_its_connector(tmp_path: Path) -> None:
    """A socket bound by another process than the connector that configured the network
    (here: the same process, but the daemon expects another pid) is never handed connections."""

    async def main() -> None:
        server = HandoffServer(Plane().dial, (PodRefused,), tmp_path)
        await server.start()
        try:
            impostor = HandoffClient(str(server.path), server.secret, os.getpid() + 1, os.getuid())
            with pytest.raises(HandoffProtocolError, match="not by the connector"):
                await impostor.connect()
            wrong_uid = HandoffClient(str(server.path), server.secret, os.getpid(), os.getuid() + 1)
            with pytest.raises(HandoffProtocolError, match="uid"):
                await wrong_uid.connect()
            # and offer() on a client that never linked sends nothing: the manager carries the flow
            user, accepted = await _tcp_pair()
            assert (await impostor.offer(accepted, ("10.43.0.10", RELAY_PORT), ("127.0.0.1", 1)))[0] == wire.NOT_MINE
            user.close()
            accepted.close()
        finally:
            await server.aclose()

    asyncio.run(main())


def test_connector_refuses_a_peer_without_the_secret(tmp_path: Path) -> None:
    """Another local process of the user that finds the socket cannot make the connector dial pods."""

    async def main() -> None:
        plane = Plane()
        server = HandoffServer(plane.dial, (PodRefused,), tmp_path)
        await server.start()
        try:
            wrong = HandoffClient(str(server.path), os.urandom(32), os.getpid(), os.getuid())
            with pytest.raises((HandoffProtocolError, ConnectionResetError)):
                await wrong.connect()
            # skipping the hello and offering at once: the descriptor is not used, the link is dropped
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(server.path))
            link = wire.Link(sock)
            user, accepted = await _tcp_pair()
            await link.send(wire.Offer(1, ("10.43.0.10", RELAY_PORT), ("127.0.0.1", 1)), [accepted.fileno()])
            assert await asyncio.wait_for(link.recv(), 5) is None  # closed on us, no answer
            assert plane.dials == []
            assert server.counts["rejected_peers"] == 2
            link.close()
            user.close()
            accepted.close()
        finally:
            await server.aclose()

    asyncio.run(main())


def test_connector_refuses_another_users_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        server = HandoffServer(Plane().dial, (PodRefused,), tmp_path)
        await server.start()
        monkeypatch.setattr(chandoff, "peer_cred", lambda s: (4242, os.getuid() + 12345, 0))
        try:
            other = HandoffClient(str(server.path), server.secret, os.getpid(), os.getuid())
            with pytest.raises((HandoffProtocolError, ConnectionResetError)):  # closed on it, hello unread
                await other.connect()
            assert server.counts["rejected_peers"] == 1
        finally:
            await server.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------- a connector that goes away
def test_link_lost_mid_offer_resets_then_new_flows_go_to_the_manager(tmp_path: Path) -> None:
    async def main() -> None:
        plane, server, client = await _linked(tmp_path)
        try:
            user, accepted = await _tcp_pair()
            pending = asyncio.ensure_future(client.offer(accepted, ("10.43.0.10", SLOW_PORT), ("127.0.0.1", 1)))
            async with asyncio.timeout(5):
                while not plane.dials:
                    await asyncio.sleep(0.01)
            await server.aclose()  # as a killed connector: its end of the link closes
            verdict, why = await asyncio.wait_for(pending, 5)
            assert verdict == LOST and "broke" in why
            assert client.status().lost == 1
            async with asyncio.timeout(5):
                while client.ready:
                    await asyncio.sleep(0.01)
            user2, accepted2 = await _tcp_pair()
            verdict, _ = await client.offer(accepted2, ("10.43.0.10", RELAY_PORT), ("127.0.0.1", 2))
            assert verdict == wire.NOT_MINE  # no link: straight to the manager, nothing waited for
            assert not client.status().linked and client.status().note
            for s in (user, accepted, user2, accepted2):
                s.close()
        finally:
            await client.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------- status text
def test_status_says_which_plane_and_why() -> None:
    st = Status(connected=True, outbound=True, data_plane=DataPlane(
        plane="direct", reason="pods/portforward allowed cluster-wide", mode="auto", sessions=3, dials=120,
        fallbacks=2, handoff_linked=True, handoff_taken=118, handoff_not_mine=2))
    text = "\n".join(render.data_plane_lines(st))
    assert "Data plane       : direct port-forward (3 sessions, 120 dials, 2 via manager" in text
    assert "118 direct, 2 to the manager" in text
    st.data_plane = DataPlane(plane="manager", reason="pods/portforward denied in team-a", mode="auto")
    assert render.data_plane_lines(st) == [
        "  Data plane       : manager tunnels (pods/portforward denied in team-a)"]
    st.data_plane = DataPlane(plane="manager", reason="connector.data_plane is manager", mode="manager")
    assert "connector.data_plane is manager" in render.data_plane_lines(st)[0]


def test_data_plane_config_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpnb import config
    from tpnb.errors import ConfigError

    monkeypatch.setenv("TPNB_CONFIG", "/nonexistent/tpnb.yaml")
    assert config.load().connector.data_plane == "auto"
    monkeypatch.setenv("TPNB_CONNECTOR_DATA_PLANE", "manager")
    cfg = config.load()
    assert cfg.connector.data_plane == "manager"
    assert cfg.sources["connector.data_plane"] == "TPNB_CONNECTOR_DATA_PLANE"
    monkeypatch.setenv("TPNB_CONNECTOR_DATA_PLANE", "fast")
    with pytest.raises(ConfigError, match="connector.data_plane"):
        config.load()
