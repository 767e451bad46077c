"""The agent link (issue 15) on loopback: common/linkframes.py's framing, credit windows and
handshake, cluster/agentlink.py's listener and connector/agentlink.py's end of a link, joined by
a plain TCP connection instead of a port-forward (the cluster test has the real one)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import pytest

from tpnb.cluster.agentlink import AgentLinks as AgentSide
from tpnb.common import linkframes as lf
from tpnb.common.forward import TunnelError
from tpnb.connector.agentlink import AgentLinks as ConnectorLinks, _ConnectorSide
from tpnb.proto import pb

pytestmark = pytest.mark.unit

IID = "ic0123456789abcd"


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------ pure parts

def test_auth_accepts_the_key_and_nothing_else() -> None:
    key = lf.derive_secret(os.urandom(32), "ns", "pod-a")
    assert key != lf.derive_secret(os.urandom(32), "ns", "pod-a")
    assert lf.derive_secret(b"k" * 32, "ns", "pod-a") != lf.derive_secret(b"k" * 32, "ns", "pod-b")
    nonce = os.urandom(lf.NONCE)
    secrets = {IID: key}
    iid, got, cn = lf.check_auth(lf.auth_payload(key, nonce, IID), nonce, secrets.get)
    assert iid == IID and got == key and len(cn) == lf.NONCE
    bad = [
        lf.auth_payload(os.urandom(32), nonce, IID),                 # wrong key
        lf.auth_payload(key, os.urandom(lf.NONCE), IID),             # answer to another nonce (replay)
        lf.auth_payload(key, nonce, "another-intercept"),            # not an intercept of ours
        b"",                                                         # nothing
        b"x" * 100,                                                  # garbage
        b"x" * (lf.MAX_HANDSHAKE + 1),                               # too long
    ]
    for payload in bad:
        with pytest.raises(lf.LinkError):
            lf.check_auth(payload, nonce, secrets.get)
    # the proof names the intercept: a valid proof for one id does not pass for another
    p = lf.auth_payload(key, nonce, IID)
    with pytest.raises(lf.LinkError):
        lf.check_auth(p[:-1] + b"e", nonce, {IID[:-1] + "e": key}.get)
    assert lf.agent_proof(key, nonce, cn, IID) != lf.client_proof(key, nonce, cn, IID)


def test_hello_and_open_payloads() -> None:
    n = os.urandom(lf.NONCE)
    assert lf.parse_hello(lf.hello_payload(n)) == n
    for bad in (b"", b"HTTP/1.1 400 Bad Request\r\n", b"TPNBLNK1" + b"x" * 5):
        with pytest.raises(lf.LinkError):
            lf.parse_hello(bad)
    assert lf.parse_open(lf.open_payload(("10.1.2.3", 40000))) == ("10.1.2.3", 40000)
    assert lf.parse_open(lf.open_payload(("fd00::1", 1))) == ("fd00::1", 1)


class _Wire(asyncio.Transport):
    """A transport that records what a Link writes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.aborted = False

    def write(self, data: Any) -> None:
        self.out += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _frames(raw: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(raw):
        k, c, n = lf.HDR.unpack_from(raw, pos)
        out.append((k, c, raw[pos + lf.HDR.size: pos + lf.HDR.size + n]))
        pos += lf.HDR.size + n
    return out


def _feed(link: lf.Link, raw: bytes, step: int = 7) -> None:
    """Feed bytes in odd pieces (frames split across reads)."""
    for i in range(0, len(raw), step):
        piece = raw[i:i + step]
        buf = link.get_buffer(len(piece))
        buf[:len(piece)] = piece
        link.buffer_updated(len(piece))


def test_frames_split_across_reads_and_credit_bounds_memory() -> None:
    async def main() -> None:
        opened: list[lf.LinkChannel] = []
        link = lf.Link(on_open=lambda ch, ip, port: opened.append(ch))
        wire = _Wire()
        link.connection_made(wire)
        link.authenticated = True
        big = os.urandom(lf.MAX_DATA)
        raw = lf.frame(lf.OPEN, 5, lf.open_payload(("10.0.0.9", 1234))) + lf.frame(lf.DATA, 5, b"GET / HTTP/1.1\r\n")
        raw += lf.frame(lf.DATA, 5, big)
        _feed(link, raw, step=4093)
        assert len(opened) == 1
        ch = opened[0]
        got = b""
        for _ in range(2):
            f = await ch.recv()
            assert f is not None and f.kind == "data"
            got += f.data
        assert got == b"GET / HTTP/1.1\r\n" + big
        await asyncio.sleep(0)
        # the consumer took > CREDIT_STEP: credit went back for exactly what it consumed
        credits = [struct.unpack("!I", p)[0] for k, c, p in _frames(bytes(wire.out)) if k == lf.CREDIT and c == 5]
        assert sum(credits) == len(got)
        _feed(link, lf.frame(lf.EOF, 5))
        f = await ch.recv()
        assert f is not None and f.kind == "eof" and await ch.recv() is None

        # a peer that ignores our window is cut off, not buffered without end
        link2 = lf.Link(on_open=lambda ch, ip, port: None)
        w2 = _Wire()
        link2.connection_made(w2)
        link2.authenticated = True
        raw = lf.frame(lf.OPEN, 1)
        for _ in range(lf.WINDOW // lf.MAX_DATA + 1):
            raw += lf.frame(lf.DATA, 1, big)
        _feed(link2, raw, step=65536)
        assert link2.lost and w2.aborted and "window" in link2.lost
    run(main)


def test_sender_waits_for_credit() -> None:
    async def main() -> None:
        link = lf.Link()
        wire = _Wire()
        link.connection_made(wire)
        link.authenticated = True
        ch = link.open_channel(("1.2.3.4", 5))
        task = asyncio.ensure_future(ch.send_data(os.urandom(lf.WINDOW + 1000)))
        await asyncio.sleep(0.05)
        sent = sum(len(p) for k, c, p in _frames(bytes(wire.out)) if k == lf.DATA)
        assert sent == lf.WINDOW and not task.done()   # blocked at the window
        _feed(link, lf.frame(lf.CREDIT, ch.id, struct.pack("!I", 4096)))
        await asyncio.wait_for(task, 5)
        sent = sum(len(p) for k, c, p in _frames(bytes(wire.out)) if k == lf.DATA)
        assert sent == lf.WINDOW + 1000
        # a reset while waiting for credit ends the send with an error
        ch2 = link.open_channel(("1.2.3.4", 6))
        t2 = asyncio.ensure_future(ch2.send_data(os.urandom(lf.WINDOW + 1)))
        await asyncio.sleep(0.02)
        _feed(link, lf.frame(lf.RESET, ch2.id, b"app went away"))
        with pytest.raises(TunnelError):
            await asyncio.wait_for(t2, 5)
        f = await ch2.recv()
        assert f is not None and f.kind == "error" and f.error == "app went away"
    run(main)


def test_unauthenticated_peer_cannot_open_or_send_large_frames() -> None:
    async def main() -> None:
        seen: list[tuple[int, bytes]] = []
        link = lf.Link(on_open=lambda *a: pytest.fail("opened before auth"),
                       on_control=lambda k, p: seen.append((k, p)))
        link.connection_made(_Wire())
        _feed(link, lf.frame(lf.DATA, 0, b"x" * (lf.MAX_HANDSHAKE + 1)))
        assert link.lost and "too large" in link.lost and not seen
    run(main)


# ------------------------------------------------------------------ agent + connector over TCP

class _FakeSession:
    target = None


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
        w.close()
    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _connector_link(port: int, ic: pb.InterceptInfo, secret: bytes) -> tuple[_ConnectorSide, ConnectorLinks]:
    owner = ConnectorLinks(_FakeSession())
    side = _ConnectorSide(owner, ic, pb.AgentLink(pod_name="pod-a", port=port, secret=secret))
    await asyncio.get_running_loop().create_connection(lambda: side, "127.0.0.1", port)
    await asyncio.wait_for(side.ready, 5)
    return side, owner


async def _agent_and_app(pod_ip: str = "") -> tuple[asyncio.AbstractServer, int, bytes, AgentSide, int]:
    """An echo app, and an agent link listener with one active intercept keyed by a random secret."""
    echo, app_port = await _echo_server()
    secret = os.urandom(32)
    intercepts = [pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE, link_secret=secret)]
    agent = AgentSide(lambda: intercepts)
    port = free_port()
    await agent.start(port, pod_ip)
    return echo, app_port, secret, agent, port


async def _roundtrip(ch: lf.LinkChannel, data: bytes) -> bytes:
    async def sender() -> None:
        await ch.send_data(data)
        ch.send_eof()
    t = asyncio.ensure_future(sender())
    got = bytearray()
    while (f := await ch.recv()) is not None:
        if f.kind == "data":
            got += f.data
        elif f.kind == "eof":
            break
        else:
            raise AssertionError(f"unexpected {f!r}")
    await t
    ch.cancel()
    return bytes(got)


def test_agent_and_connector_carry_connections_and_refuse_a_wrong_key() -> None:
    async def main() -> None:
        echo, app_port = await _echo_server()
        secret = hashlib.sha256(b"the key").digest()
        ic_agent = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE, link_secret=secret)
        intercepts = [ic_agent]
        agent = AgentSide(lambda: intercepts)
        port = free_port()
        await agent.start(port)
        assert agent.port == port
        ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                              spec=pb.InterceptSpec(target_host="127.0.0.1", local_port=app_port))
        side, owner = await _connector_link(port, ic, secret)
        await asyncio.sleep(0.05)
        assert len(agent.links.get(IID, [])) == 1

        # attackers: a wrong key, no key at all, garbage; each gets the hello and is closed
        for attack in (lf.frame(lf.AUTH, 0, lf.auth_payload(os.urandom(32), os.urandom(32), IID)),
                       b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            hello = await r.readexactly(lf.HDR.size + len(lf.MAGIC) + lf.NONCE)
            nonce = lf.parse_hello(hello[lf.HDR.size:])
            if attack == lf.frame(lf.AUTH, 0, b"")[:0]:
                pass
            elif attack.startswith(b"GET"):
                w.write(attack)
            else:  # answer the real nonce, with the wrong key
                w.write(lf.frame(lf.AUTH, 0, lf.auth_payload(os.urandom(32), nonce, IID)))
            if attack:
                await w.drain()
                rest = await asyncio.wait_for(r.read(), 10)
                assert rest == b"", rest   # nothing but the nonce, then the end
            # meanwhile the agent never routes a connection to the attacker
            assert len(agent.links.get(IID, [])) == 1
            w.close()

        # small requests on many connections, and 16 MiB both ways, byte-exact
        for i in range(50):
            ch = agent.channel_for(IID, ("10.0.0.1", 1000 + i))
            assert ch is not None
            assert await _roundtrip(ch, f"ping {i}".encode()) == f"ping {i}".encode()
        bulk = os.urandom(16 * 1024 * 1024)
        chans = [agent.channel_for(IID, ("10.0.0.2", 2000 + i)) for i in range(3)]
        got = await asyncio.gather(*(_roundtrip(c, bulk) for c in chans if c is not None))
        assert all(g == bulk for g in got)
        assert owner.stats[IID].via_link == 53

        # a connection whose reader stalls does not hold up another on the same link
        stalled = agent.channel_for(IID, ("10.0.0.3", 1))
        assert stalled is not None
        blocked = asyncio.ensure_future(stalled.send_data(os.urandom(3 * lf.WINDOW)))
        await asyncio.sleep(0.5)
        quick = agent.channel_for(IID, ("10.0.0.3", 2))
        assert quick is not None and await asyncio.wait_for(_roundtrip(quick, b"still here"), 10) == b"still here"
        blocked.cancel()
        stalled.cancel()

        # the intercept ends here: its link closes; no new channels go over links
        intercepts.clear()
        agent.update(intercepts)
        await asyncio.wait_for(side.closed, 5)
        assert agent.channel_for(IID, ("10.0.0.1", 1)) is None
        # and a link cannot be authenticated for it any more
        with pytest.raises(lf.LinkError):
            await _connector_link(port, ic, secret)
        await agent.stop()
        echo.close()
    run(main)


def test_connector_side_refuses_an_agent_without_the_key() -> None:
    """A listener that is not the agent holding our key (it cannot prove it) gets no connections."""
    async def main() -> None:
        async def impostor(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonce = os.urandom(lf.NONCE)
            w.write(lf.frame(lf.HELLO, 0, lf.hello_payload(nonce)))
            await r.readexactly(lf.HDR.size)
            w.write(lf.frame(lf.WELCOME, 0, os.urandom(32)))
            await w.drain()
            await r.read()
        srv = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        ic = pb.InterceptInfo(id=IID, spec=pb.InterceptSpec(local_port=1))
        with pytest.raises(lf.LinkError):
            await _connector_link(port, ic, os.urandom(32))
        srv.close()
    run(main)


def test_connector_follows_the_intercept_list() -> None:
    async def main() -> None:
        links = ConnectorLinks(SimpleNamespace(target=None))
        ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                              links=[pb.AgentLink(pod_name="p1", port=9903, secret=b"k" * 32),
                                     pb.AgentLink(pod_name="p2", port=0, secret=b"k" * 32)])
        links.update([ic])
        assert set(links.runners) == {(IID, "p1")}   # an agent without a link port: the manager only
        await asyncio.sleep(0.05)
        assert "p1" in links.stats[IID].notes        # not connected: the reason is kept for status
        assert links.data_path(IID).startswith("traffic-manager (agent links down)")
        links.update([])
        assert not links.runners
        await links.aclose()
    run(main)


def test_sockets_joined_by_callbacks_on_both_ends() -> None:
    """The agent's accepted connection and the connector's dial, each spliced to the link (no tasks
    per message): byte-exact both ways, half-close passed on, a local reset reaches the other end."""
    async def main() -> None:
        echo, app_port, secret, agent, port = await _agent_and_app()
        ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                              spec=pb.InterceptSpec(target_host="127.0.0.1", local_port=app_port))
        side, owner = await _connector_link(port, ic, secret)
        await asyncio.sleep(0.05)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ch = agent.channel_for(IID, w.get_extra_info("peername"))
            assert ch is not None
            await agent.splice(r, w, ch)
        front = await asyncio.start_server(handle, "127.0.0.1", 0)
        fport = front.sockets[0].getsockname()[1]

        async def client(data: bytes) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", fport)
            w.write(data)
            await w.drain()
            w.write_eof()   # half-close: the echo answers everything, then ends
            got = await r.read(-1)
            w.close()
            return got
        for i in range(20):
            assert await client(f"req {i}".encode()) == f"req {i}".encode()
        bulk = os.urandom(12 * 1024 * 1024)
        got = await asyncio.gather(client(bulk), client(bulk[::-1]))
        assert got[0] == bulk and got[1] == bulk[::-1]
        assert owner.stats[IID].via_link == 22
        assert not agent.links[IID][0].conns and not side.conns   # every channel ended and was forgotten
        front.close()
        await agent.stop()
        echo.close()
    run(main)


def test_a_link_rbac_refuses_leaves_the_manager_path_at_once() -> None:
    """pods/portforward denied: `tpnb intercept` does not wait for the link, status says why."""
    from tpnb.connector import agentlink as cal
    from tpnb.errors import PermissionDenied

    async def main() -> None:
        links = ConnectorLinks(SimpleNamespace(target=None))

        async def denied(*a: Any) -> None:
            raise PermissionDenied("User \"bob\" cannot create pods/portforward in namespace tplink")
        links._once = denied  # type: ignore[method-assign]
        ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                              links=[pb.AgentLink(pod_name="p1", port=9903, secret=b"k" * 32)])
        links.update([ic])
        t0 = asyncio.get_running_loop().time()
        assert await links.wait_up(IID, 10) is False
        assert asyncio.get_running_loop().time() - t0 < 2
        path = links.data_path(IID)
        assert path.startswith("traffic-manager (agent links down)") and "not allowed" in path, path
        links.stats_for(IID).via_manager += 1   # what session._answer_dial counts
        assert "0 via agent links, 1 via the traffic-manager" in links.data_path(IID)
        await links.aclose()
        assert cal.DENIED_BACKOFF >= 30
    run(main)


def test_the_manager_hands_each_key_to_its_session_and_its_agent_only() -> None:
    from tpnb.cluster.manager import AgentSession, ClientSession, Manager

    async def main() -> None:
        m = Manager()
        m.clients["mine"] = ClientSession(id="mine", info=pb.ClientInfo(name="me@laptop"))
        m.clients["other"] = ClientSession(id="other", info=pb.ClientInfo(name="them@laptop"))
        for i, pod in enumerate(("hello-a", "hello-b", "old-agent")):
            m.agents[f"ag{i}"] = AgentSession(id=f"ag{i}", info=pb.AgentInfo(
                name="hello", namespace="ns", pod_name=pod, pod_ip=f"10.0.0.{i}",
                link_port=0 if pod == "old-agent" else 9903))
        ic = pb.InterceptInfo(id="ic1", session_id="mine", spec=pb.InterceptSpec(
            name="hello", workload="hello", namespace="ns"))
        m.intercepts[ic.id] = ic
        m._refresh_states()
        own, theirs = m.view(ic, "mine"), m.view(ic, "other")
        assert [ln.pod_name for ln in own.links] == ["hello-a", "hello-b"]   # an agent without a link port: none
        assert not theirs.links and not theirs.link_secret
        secrets = {ln.pod_name: ln.secret for ln in own.links}
        assert len(set(secrets.values())) == 2 and all(len(s) == 32 for s in secrets.values())
        # what each agent is told is exactly its own pod's key
        for a in m.agents.values():
            if a.info.link_port:
                assert m.link_secret(ic, a.info) == secrets[a.info.pod_name]
        # a new intercept gets new keys; an ended one's key is forgotten
        del m.intercepts["ic1"]
        m._refresh_states()
        assert "ic1" not in m.link_keys
    run(main)


# ------------------------------------------------------------------ the link through pods/proxy

UPGRADE = (b"GET /tpnb-link HTTP/1.1\r\nHost: 10.0.0.5:9903\r\nUser-Agent: tpnb\r\nConnection: Upgrade\r\n"
           b"Upgrade: tpnb-link\r\nX-Forwarded-For: 10.9.9.9\r\nAccept-Encoding: gzip\r\n\r\n")


def test_the_agent_takes_only_its_own_upgrade_request() -> None:
    assert lf.upgrade_request_ok(UPGRADE[:-4])
    assert lf.upgrade_request_ok(b"GET /tpnb-link?x=1 HTTP/1.1\r\nupgrade: websocket, TPNB-LINK")
    for bad in (b"GET / HTTP/1.1\r\nUpgrade: tpnb-link",                       # another path
                b"POST /tpnb-link HTTP/1.1\r\nUpgrade: tpnb-link",             # another method
                b"GET /tpnb-link HTTP/1.1\r\nUpgrade: websocket",              # another protocol
                b"GET /tpnb-link HTTP/1.1\r\nX-Upgrade: tpnb-link",            # not the header
                b"GET /tpnb-link\r\nUpgrade: tpnb-link",                       # not HTTP/1.x
                b"\x02\x00\x00\x00\x00\x00\x00\x00\x40", b""):
        assert not lf.upgrade_request_ok(bad), bad


async def _upgraded_link(addr: tuple[str, int], ic: pb.InterceptInfo, secret: bytes,
                         request: bytes = UPGRADE) -> tuple[_ConnectorSide, ConnectorLinks, bytes]:
    """What connector/podproxy.py does after the API server, on a plain TCP connection."""
    from tpnb.connector.podproxy import UpgradedLink
    from tpnb.connector.spdy import _Conn

    conn = _Conn()
    await asyncio.get_running_loop().create_connection(lambda: conn, *addr)
    conn.write(request)
    head = await asyncio.wait_for(conn.readuntil(b"\r\n\r\n"), 5)
    owner = ConnectorLinks(_FakeSession())
    side = _ConnectorSide(owner, ic, pb.AgentLink(pod_name="pod-a", port=addr[1], secret=secret, upgrade=True))
    UpgradedLink(conn).attach(side)   # HELLO came in the same read as the 101, or right after
    await asyncio.wait_for(side.ready, 5)
    return side, owner, head


async def _attack(addr: tuple[str, int], send: bytes) -> tuple[bytes, float]:
    """Everything the listener sends to a caller that sends `send` and then waits; and when it closed."""
    loop = asyncio.get_running_loop()
    r, w = await asyncio.open_connection(*addr)
    t0 = loop.time()
    w.write(send)
    got = b""
    with contextlib.suppress(ConnectionError):
        while d := await asyncio.wait_for(r.read(65536), 15):
            got += d
    w.close()
    return got, loop.time() - t0


def test_a_link_through_the_pod_ip_listener_and_attacks_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod-IP listener (reachable from every pod): the connector's upgrade gets 101 and a working
    link; a caller that does not send our upgrade, or sends it without the key, gets nothing past
    the 101 and the nonce, and is closed."""
    from tpnb.cluster import agentlink as cag

    monkeypatch.setattr(cag, "AUTH_TIMEOUT", 1.0)

    async def main() -> None:
        echo, app_port, secret, agent, port = await _agent_and_app("127.0.0.2")  # the pod IP: another loopback address
        assert agent.upgrade
        addr = ("127.0.0.2", port)
        ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                              spec=pb.InterceptSpec(target_host="127.0.0.1", local_port=app_port))
        side, owner, head = await _upgraded_link(addr, ic, secret)
        assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: tpnb-link" in head
        await asyncio.sleep(0.05)
        for i in range(20):
            ch = agent.channel_for(IID, ("10.0.0.1", 1000 + i))
            assert ch is not None and await _roundtrip(ch, f"hi {i}".encode()) == f"hi {i}".encode()
        bulk = os.urandom(8 * 1024 * 1024)
        ch = agent.channel_for(IID, ("10.0.0.1", 2))
        assert ch is not None and await _roundtrip(ch, bulk) == bulk
        assert owner.stats[IID].via_link == 21

        hello = lf.frame(lf.HELLO, 0, b"")[:1]
        # the link protocol straight at the pod IP, no upgrade: nothing at all, closed after AUTH_TIMEOUT
        wrong = lf.frame(lf.AUTH, 0, os.urandom(64) + IID.encode())
        got, took = await _attack(addr, wrong)
        assert got == b"" and took < 4, (got, took)
        # another HTTP request: nothing, closed at once
        got, took = await _attack(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got == b"" and took < 1, (got, took)
        # a request head that never ends: closed once it passes 8 KB
        got, took = await _attack(addr, b"GET /tpnb-link HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000)
        assert got == b"" and took < 1, (got, took)
        # our upgrade, then a wrong key: the 101 and the nonce, then nothing; closed
        got, took = await _attack(addr, UPGRADE + wrong)
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ") and rest[:1] == hello and len(rest) == lf.HDR.size + 40, got
        # our upgrade and silence: the same, closed after AUTH_TIMEOUT
        got, took = await _attack(addr, UPGRADE)
        head2, _, rest2 = got.partition(b"\r\n\r\n")
        assert head2 == head and rest2[:1] == hello and len(rest2) == lf.HDR.size + 40 and took < 4, got
        # the legitimate link served throughout
        ch = agent.channel_for(IID, ("10.0.0.1", 3))
        assert ch is not None and await _roundtrip(ch, b"still here") == b"still here"
        assert not side.lost
        await agent.stop()
        echo.close()
    run(main)


def test_no_pod_ip_no_upgrade_listener() -> None:
    async def main() -> None:
        agent = AgentSide(lambda: [])
        await agent.start(free_port(), "")
        assert agent.port and not agent.upgrade
        other = AgentSide(lambda: [])
        await other.start(free_port(), "192.0.2.1")   # not an address of this host: port-forward only
        assert other.port and not other.upgrade
        await agent.stop()
        await other.stop()
    run(main)


def test_a_link_falls_back_to_the_port_forward_when_pods_proxy_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """pods/proxy refused (an older agent, a NetworkPolicy, RBAC): the same attempt takes the
    port-forward, status says which way and why, and pods/proxy waits PROXY_RETRY before a retry."""
    from tpnb import config as tpnb_config
    from tpnb.connector import agentlink as cal
    from tpnb.connector.podproxy import ProxyUnavailable

    async def main() -> None:
        links = ConnectorLinks(SimpleNamespace(target=None))
        calls: list[str] = []

        async def once_via(key: tuple[str, str], ic: Any, link: Any, via: str) -> None:
            calls.append(via)
            if via == cal.VIA_PROXY:
                raise ProxyUnavailable("HTTP 503 error trying to reach service")
            links.live[key] = SimpleNamespace()
            links.via[key] = via
            try:
                await asyncio.sleep(3600)
            finally:
                del links.live[key]
        links._once_via = once_via  # type: ignore[method-assign]
        ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                              links=[pb.AgentLink(pod_name="p1", port=9903, secret=b"k" * 32, upgrade=True),
                                     pb.AgentLink(pod_name="p2", port=9903, secret=b"j" * 32)])
        links.update([ic])
        assert await links.wait_up(IID, 5)
        assert sorted(calls) == sorted([cal.VIA_PORTFORWARD, cal.VIA_PORTFORWARD, cal.VIA_PROXY])  # p2 offers none
        path = links.data_path(IID)
        assert path.startswith("agent link (2/2 pods, port-forward)"), path
        assert "p1: pods/proxy HTTP 503" in path, path
        assert links.no_proxy[(IID, "p1")][0] > asyncio.get_running_loop().time() + cal.PROXY_RETRY - 5
        assert not links._proxy_wanted((IID, "p1"), ic.links[0])   # not again until PROXY_RETRY
        links.no_proxy.clear()
        assert links._proxy_wanted((IID, "p1"), ic.links[0])
        monkeypatch.setenv("TPNB_AGENT_LINK", "port-forward")
        monkeypatch.setattr(tpnb_config, "_cached", None)
        assert not links._proxy_wanted((IID, "p1"), ic.links[0])   # agent.link: port-forward
        await links.aclose()
    run(main)
