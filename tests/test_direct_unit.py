"""The direct data plane's pure logic (connector/direct.py, the session in connector/spdy.py).

* address resolution from plain Service / EndpointSlice / Pod objects, as the
  watches deliver them;
* the multiplexed SPDY session: stream ids and ``requestID`` bookkeeping, one
  header-compression stream per connection, frames dispatched by stream id,
  per-stream FIN / RST, refusals, a broken connection, idle close,
  backpressure;
* `DirectConn.relay` half-closing both ways, and `DirectPlane.dial`'s
  fallbacks and counters.

Bytes are fed into the session's receive buffer the way the SSL transport
would (tests/test_spdy_unit.py's fakes); local sockets are socketpairs.  The
real API server, kubelet and containerd are in tests/test_direct_plane.py.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import types
import zlib
from typing import Any

import pytest
from test_spdy_unit import FakeTransport, data_frame, feed, parse_frames, syn_reply

from tpnb.connector import direct, spdy
from tpnb.connector.direct import AddressBook, DirectConn, DirectDialRefused, DirectPlane, PodTarget

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_test_sockets() -> Any:
    """Every socket a test made is closed after it (the relays close their own ends already)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def spair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    _OPEN.extend((a, b))
    return a, b


# ====================================================================== objects
def service(ns: str, name: str, ip: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, **spec}}


def endpoint_slice(ns: str, name: str, svc: str, ports: list[dict[str, Any]],
                   endpoints: list[tuple[str, str | None, bool | None]]) -> dict[str, Any]:
    """endpoints: (address, pod name or None, ready or None for unset)."""
    eps = []
    for addr, pod, ready in endpoints:
        ep: dict[str, Any] = {"addresses": [addr], "conditions": {} if ready is None else {"ready": ready}}
        if pod:
            ep["targetRef"] = {"kind": "Pod", "namespace": ns, "name": pod}
        eps.append(ep)
    return {"metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ports, "endpoints": eps}


def pod(ns: str, name: str, ip: str, phase: str = "Running", host: bool = False) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name}, "spec": {"hostNetwork": host},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}


def test_clusterip_resolves_to_ready_endpoints_round_robin_with_named_target_ports() -> None:
    book = AddressBook()
    book.apply("Service", "ADDED", service("shop", "web", "10.96.0.10", [
        {"name": "http", "port": 80, "targetPort": "web"}, {"name": "metrics", "port": 9090, "targetPort": 9100},
        {"name": "dns", "port": 53, "protocol": "UDP"}]))
    # the named targetPort "web" is 8080 in one version of the pods and 8081 in the other: two slices
    book.apply("EndpointSlice", "ADDED", endpoint_slice("shop", "web-a", "web",
               [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}],
               [("10.244.1.5", "web-1", True), ("10.244.1.6", "web-2", None), ("10.244.1.7", "web-3", False)]))
    book.apply("EndpointSlice", "ADDED", endpoint_slice("shop", "web-b", "web", [{"name": "http", "port": 8081}],
               [("10.244.2.9", "web-4", True)]))
    got = [book.resolve("10.96.0.10", 80) for _ in range(6)]
    targets = {(t.pod, t.port) for t in got if t}
    # web-3 is not ready; unset "ready" counts as ready; each pod with its own resolved port
    assert targets == {("web-1", 8080), ("web-2", 8080), ("web-4", 8081)}
    assert [t.pod for t in got[:3]] != [t.pod for t in got[1:4]]  # it rotates
    assert sorted(t.pod for t in got[:3]) == ["web-1", "web-2", "web-4"]  # every endpoint once per round
    assert got[0].namespace == "shop" and got[0].via == "service shop/web"
    assert book.resolve("10.96.0.10", 9090) in (PodTarget("shop", "web-1", 9100, "service shop/web"),
                                                PodTarget("shop", "web-2", 9100, "service shop/web"))
    assert book.resolve("10.96.0.10", 53) is None  # UDP: the manager carries it
    assert book.resolve("10.96.0.10", 443) is None  # no such Service port
    assert book.resolve("10.96.0.99", 80) is None  # unknown address


def test_service_without_ready_endpoints_and_updates() -> None:
    book = AddressBook()
    book.apply("Service", "ADDED", service("a", "s", "10.96.1.1", [{"port": 7070}]))
    assert book.resolve("10.96.1.1", 7070) is None  # no slice yet
    sl = endpoint_slice("a", "s-x", "s", [{"port": 7070}], [("10.244.0.3", "p1", False)])
    book.apply("EndpointSlice", "ADDED", sl)
    assert book.resolve("10.96.1.1", 7070) is None  # not ready
    sl["endpoints"][0]["conditions"]["ready"] = True
    book.apply("EndpointSlice", "MODIFIED", sl)
    assert book.resolve("10.96.1.1", 7070) == PodTarget("a", "p1", 7070, "service a/s")
    book.apply("EndpointSlice", "DELETED", sl)
    assert book.resolve("10.96.1.1", 7070) is None
    book.apply("EndpointSlice", "ADDED", sl)
    book.apply("Service", "DELETED", {"metadata": {"namespace": "a", "name": "s"}})
    assert book.resolve("10.96.1.1", 7070) is None
    # a list replaces what a namespace had: objects gone from it are dropped
    book.replace("Service", [service("a", "t", "10.96.1.2", [{"port": 1}])], "a")
    book.replace("Pod", [pod("a", "p1", "10.244.0.3"), pod("b", "q", "10.244.0.4")])
    book.replace("Pod", [], "a")
    assert book.resolve("10.244.0.3", 80) is None and book.resolve("10.244.0.4", 80) is not None


def test_pod_ip_resolves_to_that_pod_on_any_port() -> None:
    book = AddressBook()
    book.replace("Pod", [pod("ns", "app", "10.244.1.20"), pod("ns", "done", "10.244.1.21", phase="Succeeded"),
                         pod("kube-system", "proxy", "192.168.50.2", host=True),
                         pod("ns", "v6", "fd00::0:1")])
    assert book.resolve("10.244.1.20", 5432) == PodTarget("ns", "app", 5432, "pod")
    assert book.resolve("10.244.1.21", 80) is None  # not running
    assert book.resolve("192.168.50.2", 10250) is None  # host network: the node's address, not a pod's
    assert book.resolve("fd00::1", 80) == PodTarget("ns", "v6", 80, "pod")  # addresses compare normalised
    assert book.resolve("10.244.1.20", 0) is None
    # the IP moves to a new pod before the old one's deletion arrives
    book.apply("Pod", "ADDED", pod("ns", "app2", "10.244.1.20"))
    book.apply("Pod", "DELETED", pod("ns", "app", "10.244.1.20"))
    assert book.resolve("10.244.1.20", 80).pod == "app2"  # type: ignore[union-attr]
    terminating = pod("ns", "app2", "10.244.1.20")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    book.apply("Pod", "MODIFIED", terminating)
    assert book.resolve("10.244.1.20", 80) is None


def test_headless_externalname_and_selectorless_services() -> None:
    book = AddressBook()
    book.apply("Service", "ADDED", service("a", "headless", "None", [{"port": 80}]))
    book.apply("Service", "ADDED", {"metadata": {"namespace": "a", "name": "ext"},
                                    "spec": {"type": "ExternalName", "externalName": "example.org"}})
    assert not book._svc_by_ip  # neither has an address of its own
    # a Service without selector and a hand-made slice: usable where the address is a known pod
    book.apply("Service", "ADDED", service("a", "manual", "10.96.3.3", [{"port": 80}]))
    book.apply("EndpointSlice", "ADDED", endpoint_slice("a", "manual-1", "manual", [{"port": 8000}],
                                                        [("10.244.5.5", None, True), ("203.0.113.9", None, True)]))
    assert book.resolve("10.96.3.3", 80) is None
    book.apply("Pod", "ADDED", pod("a", "backend", "10.244.5.5"))
    assert book.resolve("10.96.3.3", 80) == PodTarget("a", "backend", 8000, "service a/manual")


# ====================================================================== the session
def new_session(idle: float = 30.0) -> tuple[spdy.SpdySession, spdy._Conn, FakeTransport, list[str]]:
    conn = spdy._Conn()
    tr = FakeTransport()
    conn.connection_made(tr)  # type: ignore[arg-type]
    closed: list[str] = []
    s = spdy.SpdySession(conn, "ns/pod", idle, on_close=lambda s: closed.append(s.reason))
    return s, conn, tr, closed


def syn_streams(raw: bytes, z: Any) -> list[tuple[int, int, dict[str, str]]]:
    """(stream id, flags, headers) of every SYN_STREAM, inflating with the connection's one zlib stream."""
    out = []
    for control, kind, flags, payload in parse_frames(raw):
        if control and kind == spdy.SYN_STREAM:
            sid, = struct.unpack_from("!I", payload)
            block = z.decompress(payload[10:])
            n, = struct.unpack_from("!I", block)
            pos, hdrs = 4, {}
            for _ in range(n):
                kl, = struct.unpack_from("!I", block, pos)
                k = block[pos + 4: pos + 4 + kl].decode()
                pos += 4 + kl
                vl, = struct.unpack_from("!I", block, pos)
                hdrs[k] = block[pos + 4: pos + 4 + vl].decode()
                pos += 4 + vl
            out.append((sid, flags, hdrs))
    return out


async def open_pair(s: spdy.SpdySession, conn: spdy._Conn, port: int) -> spdy.MuxStream:
    task = asyncio.create_task(s.open_pair(port, 5))
    await asyncio.sleep(0)
    did = s.next_id - 2
    feed(conn, syn_reply(did - 2) + syn_reply(did))
    return await asyncio.wait_for(task, 2)


async def test_pairs_get_ids_and_request_ids_on_one_compression_stream() -> None:
    s, conn, tr, _ = new_session()
    first = await open_pair(s, conn, 7070)
    second = await open_pair(s, conn, 8080)
    z = zlib.decompressobj()
    syns = syn_streams(bytes(tr.out), z)
    assert [(sid, flags) for sid, flags, _ in syns] == [(1, spdy.FLAG_FIN), (3, 0), (5, spdy.FLAG_FIN), (7, 0)]
    assert [h["streamtype"] for _, _, h in syns] == ["error", "data", "error", "data"]
    assert [h["requestid"] for _, _, h in syns] == ["0", "0", "1", "1"]
    assert [h["port"] for _, _, h in syns] == ["7070", "7070", "8080", "8080"]
    assert (first.error_id, first.data_id, first.request_id) == (1, 3, 0)
    assert (second.error_id, second.data_id, second.request_id) == (5, 7, 1)
    assert set(s.streams) == {1, 3, 5, 7}


async def test_open_pair_waits_for_the_data_streams_reply() -> None:
    s, conn, _, _ = new_session()
    task = asyncio.create_task(s.open_pair(80, 5))
    await asyncio.sleep(0)
    feed(conn, syn_reply(1))  # the error stream's reply is not enough
    await asyncio.sleep(0.01)
    assert not task.done()
    feed(conn, syn_reply(3))
    st = await asyncio.wait_for(task, 1)
    assert st.data_id == 3
    # a dial that times out resets its streams and forgets them
    with pytest.raises(TimeoutError):
        await s.open_pair(80, 0.05)
    assert set(s.streams) == {1, 3}
    assert any(c and k == spdy.RST_STREAM and struct.unpack("!I", p[:4])[0] == 7
               for c, k, _, p in parse_frames(bytes(conn.transport.out)))  # type: ignore[union-attr]


async def test_frames_are_dispatched_by_stream_id_and_fin_half_closes_one() -> None:
    s, conn, tr, _ = new_session()
    a, b = await open_pair(s, conn, 1), await open_pair(s, conn, 2)
    a_loc, a_cli = spair()
    b_loc, b_cli = spair()
    for x in (a_loc, b_loc, a_cli, b_cli):
        x.setblocking(False)
    feed(conn, data_frame(3, b"early-a"))  # before the relay attached its socket: kept
    a.attach(a_loc)
    b.attach(b_loc)
    # interleaved, and cut at odd places
    feed(conn, data_frame(7, b"b1") + data_frame(3, b"a1") + data_frame(7, b"b2")
         + data_frame(3, b"", fin=True) + spdy.control_frame(spdy.PING, 0, b"\0\0\0\x09"), pieces=5)
    await asyncio.sleep(0.01)
    assert a_cli.recv(100) == b"early-a" + b"a1" and a_cli.recv(100) == b""  # FIN -> EOF on a only
    assert b_cli.recv(100) == b"b1b2"
    with pytest.raises(BlockingIOError):
        b_cli.recv(100)
    assert a.down_done.done() and not b.down_done.done()
    assert (True, spdy.PING, 0, b"\0\0\0\x09") in parse_frames(bytes(tr.out))
    # a: the local side ends too; with the error stream's FIN the pair is forgotten
    a.send_fin()
    feed(conn, data_frame(1, b"", fin=True))
    assert set(s.streams) == {5, 7}
    assert parse_frames(bytes(tr.out))[-1] == (False, 3, spdy.FLAG_FIN, b"")
    # frames for a finished stream are ignored; b is untouched
    feed(conn, data_frame(3, b"late") + data_frame(7, b"b3"))
    await asyncio.sleep(0.01)
    assert b_cli.recv(100) == b"b3"


async def test_refusal_and_reset_fail_only_their_stream() -> None:
    s, conn, _, _ = new_session()
    refused, reset, fine = [await open_pair(s, conn, p) for p in (1, 2, 3)]
    # the runtime's order for a failed dial: error text, error FIN, data FIN
    feed(conn, data_frame(1, b"error forwarding port 1 to pod x: dial tcp4 127.0.0.1:1: connect: connection refused")
         + data_frame(1, b"", fin=True) + data_frame(3, b"", fin=True))
    with pytest.raises(spdy.StreamRefused, match="connection refused"):
        await asyncio.wait_for(refused.down_done, 1)
    feed(conn, spdy.control_frame(spdy.RST_STREAM, 0, struct.pack("!II", reset.data_id, 5)))
    with pytest.raises(spdy.StreamReset, match="reset"):
        await asyncio.wait_for(reset.down_done, 1)
    assert set(s.streams) == {fine.error_id, fine.data_id} and not fine.down_done.done()
    # the other order (data FIN first, the reason after it) is a refusal too
    late = await open_pair(s, conn, 4)
    feed(conn, data_frame(late.data_id, b"", fin=True))
    await asyncio.sleep(0.01)
    assert not late.down_done.done()  # waiting for the error stream
    feed(conn, data_frame(late.error_id, b"connect: connection refused", fin=True))
    with pytest.raises(spdy.StreamRefused):
        await asyncio.wait_for(late.down_done, 1)


async def test_an_empty_answer_is_no_refusal() -> None:
    s, conn, _, _ = new_session()
    st = await open_pair(s, conn, 80)
    loc, cli = spair()
    st.attach(loc)
    feed(conn, data_frame(st.error_id, b"", fin=True) + data_frame(st.data_id, b"", fin=True))
    await asyncio.wait_for(st.down_done, 1)
    assert cli.recv(10) == b""


async def test_broken_connection_fails_every_stream_and_the_session_closes() -> None:
    s, conn, _, closed = new_session()
    sts = [await open_pair(s, conn, p) for p in (1, 2)]
    waiting = asyncio.create_task(s.open_pair(3, 5))
    await asyncio.sleep(0)
    feed(conn, data_frame(3, b"x" * 100)[:50])
    conn.connection_lost(None)
    for st in sts:
        with pytest.raises(spdy.StreamReset, match="session ended"):
            await asyncio.wait_for(st.down_done, 1)
    with pytest.raises(spdy.StreamReset):
        await asyncio.wait_for(waiting, 1)
    assert s.closed and closed == ["the connection ended inside a frame"] and not s.streams
    with pytest.raises(spdy.SessionClosed):
        await s.open_pair(4, 1)


async def test_idle_close_goaway_and_id_exhaustion() -> None:
    s, conn, tr, closed = new_session(idle=0.05)
    st = await open_pair(s, conn, 1)
    await asyncio.sleep(0.1)
    assert not s.closed  # a stream is open: not idle
    st.reset()
    await asyncio.sleep(0.1)
    assert s.closed and closed == ["idle"] and tr.closed
    s, conn, tr, closed = new_session()
    st = await open_pair(s, conn, 1)
    feed(conn, spdy.control_frame(spdy.GOAWAY, 0, struct.pack("!II", 0, 0)))
    with pytest.raises(spdy.SessionClosed, match="GOAWAY"):
        await s.open_pair(2, 1)
    assert not s.closed  # the open stream goes on
    st.reset()
    assert s.closed and closed
    s, conn, _, _ = new_session()
    s.next_id = spdy.MAX_STREAM_ID - 3
    with pytest.raises(spdy.SessionClosed, match="used up"):
        await s.open_pair(1, 1)


async def test_a_stalled_reader_pauses_the_connection_until_it_drains() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 1)
    loc, cli = spair()
    loc.setblocking(False)
    st.attach(loc)
    chunk = b"z" * 200_000
    total = 0
    while not tr.paused and total < 64 * 1024 * 1024:
        feed(conn, data_frame(st.data_id, chunk))
        total += len(chunk)
    assert tr.paused and spdy.PENDING_HIGH < s._pending < spdy.PENDING_HIGH + len(chunk) + 1
    cli.setblocking(False)
    got = 0
    for _ in range(2000):
        try:
            got += len(cli.recv(1 << 20))
        except BlockingIOError:
            await asyncio.sleep(0.001)
        if got == total:
            break
    assert got == total and not tr.paused and s._pending == 0


# ====================================================================== relay and dial
def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: unlike a Unix socketpair, an abort shows as a reset."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        mine, _ = srv.accept()
    _OPEN.extend((mine, client))
    return mine, client


def fake_plane() -> DirectPlane:
    plane = DirectPlane(types.SimpleNamespace(namespace="default", proxy=None))  # type: ignore[arg-type]
    plane._started = True
    return plane


async def test_relay_half_closes_both_ways() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 7070)
    plane = fake_plane()
    mine, client = spair()
    relay = asyncio.create_task(DirectConn(plane, st, PodTarget("ns", "pod", 7070, "pod")).relay(mine, b"GET /"))
    loop = asyncio.get_running_loop()
    client.setblocking(False)
    await loop.sock_sendall(client, b" HTTP/1.0\r\n\r\n")
    client.shutdown(socket.SHUT_WR)  # the client is done sending: FIN to the pod
    for _ in range(100):
        frames = [f for f in parse_frames(bytes(tr.out)) if not f[0]]
        if frames and frames[-1][2] & spdy.FLAG_FIN:
            break
        await asyncio.sleep(0.01)
    assert b"".join(f[3] for f in frames) == b"GET / HTTP/1.0\r\n\r\n"
    assert frames[-1] == (False, st.data_id, spdy.FLAG_FIN, b"") and not relay.done()
    # the pod answers after the client's EOF, then ends: the client reads it all, then EOF
    feed(conn, data_frame(st.data_id, b"HTTP/1.0 200 OK\r\n\r\nhi") + data_frame(st.error_id, b"", fin=True)
         + data_frame(st.data_id, b"", fin=True))
    await asyncio.wait_for(relay, 2)
    client.setblocking(True)
    client.settimeout(2)
    assert client.recv(100) == b"HTTP/1.0 200 OK\r\n\r\nhi" and client.recv(100) == b""
    assert not s.streams  # the pair is done and forgotten
    assert mine.fileno() == -1  # the relay closed its socket


async def test_relay_lets_the_client_keep_sending_after_the_pods_fin() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 7070)
    mine, client = spair()
    relay = asyncio.create_task(DirectConn(fake_plane(), st, PodTarget("n", "p", 1, "pod")).relay(mine))
    feed(conn, data_frame(st.error_id, b"", fin=True) + data_frame(st.data_id, b"bye", fin=True))
    await asyncio.sleep(0.05)  # the relay attaches the socket and delivers
    client.settimeout(2)
    assert client.recv(10) == b"bye" and client.recv(10) == b""
    client.sendall(b"still here")
    client.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(relay, 2)
    frames = [f for f in parse_frames(bytes(tr.out)) if not f[0]]
    assert b"".join(f[3] for f in frames) == b"still here" and frames[-1][2] == spdy.FLAG_FIN


async def test_relay_resets_the_client_on_a_late_refusal_and_counts_it() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 9)
    plane = fake_plane()
    mine, client = tcp_pair()
    relay = asyncio.create_task(DirectConn(plane, st, PodTarget("n", "p", 9, "pod")).relay(mine))
    await asyncio.sleep(0)
    feed(conn, data_frame(st.error_id, b"dial tcp4 127.0.0.1:9: connect: connection refused", fin=True)
         + data_frame(st.data_id, b"", fin=True))
    await asyncio.wait_for(relay, 2)
    client.settimeout(2)
    with pytest.raises(ConnectionResetError):
        client.recv(10)  # RST, as for a refused dial through the manager
    assert plane.status().dial_errors == 1


async def test_relay_aborts_on_a_broken_session_and_resets_the_stream_on_a_client_reset() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 1)
    mine, client = tcp_pair()
    relay = asyncio.create_task(DirectConn(fake_plane(), st, PodTarget("n", "p", 1, "pod")).relay(mine))
    await asyncio.sleep(0)
    conn.connection_lost(None)
    await asyncio.wait_for(relay, 2)
    client.settimeout(2)
    with pytest.raises(ConnectionResetError):
        client.recv(10)
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 1)
    mine, client = tcp_pair()
    relay = asyncio.create_task(DirectConn(fake_plane(), st, PodTarget("n", "p", 1, "pod")).relay(mine))
    await asyncio.sleep(0)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # the client gives up: the pod side is told with RST_STREAM
    await asyncio.wait_for(relay, 2)
    assert (True, spdy.RST_STREAM) in [(c, k) for c, k, _, p in parse_frames(bytes(tr.out))
                                       if c and struct.unpack("!I", p[:4])[0] == st.data_id]
    assert not s.streams


async def test_dial_falls_back_and_raises_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    plane = fake_plane()
    plane.book.replace("Pod", [pod("ok", "app", "10.244.0.10"), pod("nope", "app", "10.244.0.11")])
    plane._rbac = {"ok": (True, 1e18), "nope": (False, 1e18)}
    s, conn, _, _ = new_session()
    opened: list[tuple[str, str]] = []

    async def session(ns: str, name: str, timeout: float, port: int = 0) -> spdy.SpdySession:
        opened.append((ns, name))
        return s

    monkeypatch.setattr(plane, "_session", session)
    assert await plane.dial("10.244.0.99", 80) is None  # unknown address
    assert await plane.dial("10.244.0.11", 80) is None  # RBAC denies that namespace
    assert opened == []
    task = asyncio.create_task(plane.dial("10.244.0.10", 8080))
    for _ in range(100):
        await asyncio.sleep(0)
        if s.streams:
            break
    feed(conn, syn_reply(1) + syn_reply(3))
    got = await asyncio.wait_for(task, 2)
    assert isinstance(got, DirectConn) and got.target == PodTarget("ok", "app", 8080, "pod")
    got.abort()
    # the reason arrives before the data stream's reply: dial raises
    task = asyncio.create_task(plane.dial("10.244.0.10", 1))
    for _ in range(100):
        await asyncio.sleep(0)
        if len(s.streams) == 2:
            break
    feed(conn, data_frame(5, b"connect: connection refused", fin=True))
    with pytest.raises(DirectDialRefused, match="connection refused") as ei:
        await asyncio.wait_for(task, 2)
    assert isinstance(ei.value, ConnectionRefusedError)
    st = plane.status()
    assert (st.dials, st.fallbacks, st.dial_errors) == (1, 2, 1)
    assert st.namespaces_denied == ["nope"] and st.active and "ok" in st.reason


async def test_dial_retries_once_on_a_session_that_broke() -> None:
    plane = fake_plane()
    plane.book.replace("Pod", [pod("ok", "app", "10.244.0.10")])
    plane._rbac = {"ok": (True, 1e18)}
    dead, _, _, _ = new_session()
    dead.close("broken")
    s, conn, _, _ = new_session()
    sessions = [dead, s]

    async def session(ns: str, name: str, timeout: float, port: int = 0) -> spdy.SpdySession:
        return sessions.pop(0)

    plane._session = session  # type: ignore[method-assign]
    task = asyncio.create_task(plane.dial("10.244.0.10", 80))
    for _ in range(100):
        await asyncio.sleep(0)
        if s.streams:
            break
    feed(conn, syn_reply(1) + syn_reply(3))
    assert isinstance(await asyncio.wait_for(task, 2), DirectConn)


def test_status_before_start_and_with_a_proxy() -> None:
    plane = DirectPlane(types.SimpleNamespace(namespace="default", proxy="http://proxy:3128"))  # type: ignore[arg-type]
    st = plane.status()
    assert not st.active and st.reason == "not started" and st.sessions == 0
    asyncio.run(plane.start())
    assert not plane.status().active and "proxy" in plane.status().reason
    assert direct.DirectStatus(active=True, reason="x").dials == 0


async def test_relay_uploads_in_frames_that_grow_to_frame_max() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 1)
    mine, client = spair()
    relay = asyncio.create_task(DirectConn(fake_plane(), st, PodTarget("n", "p", 1, "pod")).relay(mine))
    payload = bytes(range(256)) * 4096  # 1 MiB
    loop = asyncio.get_running_loop()
    client.setblocking(False)
    await loop.sock_sendall(client, payload)
    client.shutdown(socket.SHUT_WR)
    for _ in range(200):
        frames = [f for f in parse_frames(bytes(tr.out)) if not f[0]]
        if frames and frames[-1][2] & spdy.FLAG_FIN:
            break
        await asyncio.sleep(0.01)
    assert b"".join(f[3] for f in frames) == payload
    assert len(frames[0][3]) <= spdy.UP_FIRST and max(len(f[3]) for f in frames) <= spdy.FRAME_MAX
    feed(conn, data_frame(st.error_id, b"", fin=True) + data_frame(st.data_id, b"", fin=True))
    await asyncio.wait_for(relay, 2)


# ====================================================================== the reflector's relist
async def test_reflector_lists_again_when_its_version_is_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted list and watch, for the one reflector path the dev cluster cannot produce on demand: the API
    server's watch cache for Services keeps every version since the cluster started, so it never answers
    410 for them in a test's time.  The scripted ERROR is the event the real API server sends for an
    expired version (`test_watch_events_follows_the_api_server_and_reports_expiry_and_refusal` gets it for
    leases); the rest of the reflector runs against the real API server in tests/test_direct_plane.py."""
    plane = fake_plane()
    svc = lambda name, ip, rv: {**service("a", name, ip, [{"port": 80}]),  # noqa: E731
                                "metadata": {"namespace": "a", "name": name, "resourceVersion": rv}}
    lists = [{"metadata": {"resourceVersion": "10"}, "items": [svc("one", "10.96.0.1", "9")]},
             {"metadata": {"resourceVersion": "20"}, "items": [svc("two", "10.96.0.2", "19")]}]
    seen: list[str] = []
    hold = asyncio.Event()
    expired = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 10 (15)", "reason": "Expired", "code": 410}

    async def request(t: Any, method: str, path: str, **kw: Any) -> Any:
        seen.append(f"list {path}")
        return lists.pop(0)

    async def watch(t: Any, path: str, rv: str, timeout_seconds: int = 300, **kw: Any) -> Any:
        seen.append(f"watch {rv}")
        if rv == "10":
            yield "ERROR", expired
        await hold.wait()

    monkeypatch.setattr(direct.kube, "request", request)
    monkeypatch.setattr(direct.kube, "watch_events", watch)
    r = direct._Reflector(plane, "Service", "a")
    task = asyncio.create_task(r.run())
    try:
        await asyncio.wait_for(r.first.wait(), 2)
        for _ in range(100):
            if seen[-1:] == ["watch 20"]:
                break
            await asyncio.sleep(0.01)
        # at once (no back-off), and the relist replaced what the namespace had
        assert seen == ["list /api/v1/namespaces/a/services", "watch 10",
                        "list /api/v1/namespaces/a/services", "watch 20"]
        assert sorted(k[1] for k in plane.book.services) == ["two"] and r.listed and not r.error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_dial_with_refusal_wait_raises_a_late_refusal_and_returns_early_on_data(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plane = fake_plane()
    plane.book.replace("Pod", [pod("ok", "app", "10.244.0.10")])
    plane._rbac = {"ok": (True, 1e18)}
    s, conn, _, _ = new_session()

    async def session(ns: str, name: str, timeout: float, port: int = 0) -> spdy.SpdySession:
        return s

    monkeypatch.setattr(plane, "_session", session)

    async def dial_and(answer: bytes, wait: float) -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        task = asyncio.create_task(plane.dial("10.244.0.10", 80, refusal_wait=wait))
        for _ in range(100):
            await asyncio.sleep(0)
            if s.streams:
                break
        did = s.next_id - 2
        feed(conn, syn_reply(did - 2) + syn_reply(did))  # accepted first, as the runtime does...
        await asyncio.sleep(0.02)
        feed(conn, answer)  # ...then what its dial gave
        try:
            return await asyncio.wait_for(task, 5), loop.time() - t0
        except DirectDialRefused as exc:
            return exc, loop.time() - t0

    got, _ = await dial_and(data_frame(s.next_id, b"connect: connection refused", fin=True), 5)  # error stream
    assert isinstance(got, DirectDialRefused) and "refused" in str(got)
    got, took = await dial_and(data_frame(s.next_id + 2, b"SSH-2.0-banner\r\n"), 5)  # data: the pod spoke first
    assert isinstance(got, DirectConn) and took < 1
    got.abort()
    got, took = await dial_and(b"", 0.2)  # silence: a successful dial, after the wait
    assert isinstance(got, DirectConn) and 0.2 <= took < 1
    got.abort()
    assert plane.status().dial_errors == 1 and plane.status().dials == 2


async def test_rbac_answers_are_cached_and_a_denial_is_asked_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    plane = fake_plane()
    asked: list[str] = []
    allowed = {"a": True, "b": False}

    async def ssar(ns: str) -> bool:
        asked.append(ns)
        await asyncio.sleep(0.01)
        return allowed[ns]

    monkeypatch.setattr(plane, "_ssar", ssar)
    # concurrent first dials into a namespace share one review
    assert await asyncio.gather(plane._allowed("a"), plane._allowed("a"), plane._allowed("b")) == [True, True, False]
    assert sorted(asked) == ["a", "b"]
    assert await plane._allowed("a") and not await plane._allowed("b") and len(asked) == 2  # cached
    # an admin grants b; once the denial is older than its TTL the next dial answers from the cache
    # (still denied: no wait) and asks again behind it
    allowed["b"] = True
    monkeypatch.setattr(direct, "RBAC_TTL_DENIED", 0.0)
    assert not await plane._allowed("b")
    await asyncio.sleep(0.05)
    assert await plane._allowed("b") and asked.count("b") == 2
    plane._deny("a")  # a 403 from an upgrade
    assert plane.status().namespaces_denied == ["a"]


async def test_a_stream_nobody_attaches_is_reset_so_the_session_can_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spdy, "ATTACH_TIMEOUT", 0.05)
    s, conn, tr, closed = new_session(idle=0.05)
    st = await open_pair(s, conn, 1)  # a dial whose caller never relays nor aborts
    await asyncio.sleep(0.3)
    assert st.finished and s.closed and closed == ["idle"]
    assert any(c and k == spdy.RST_STREAM for c, k, _, _ in parse_frames(bytes(tr.out)))


async def test_upload_stops_reading_while_the_api_server_connection_is_full() -> None:
    s, conn, tr, _ = new_session()
    st = await open_pair(s, conn, 1)
    mine, client = spair()
    mine.setblocking(False)
    up = asyncio.create_task(st.pump_up(mine))
    conn.pause_writing()  # the TLS transport's buffer is above its high-water mark
    client.sendall(b"first")
    await asyncio.sleep(0.05)
    sent = lambda: b"".join(f[3] for f in parse_frames(bytes(tr.out)) if not f[0])  # noqa: E731
    assert sent() == b"first"  # that read happened; no more until the transport drains
    client.sendall(b"second")
    await asyncio.sleep(0.05)
    assert sent() == b"first"
    conn.resume_writing()
    await asyncio.sleep(0.05)
    assert sent() == b"firstsecond"
    client.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(up, 2)
    assert parse_frames(bytes(tr.out))[-1] == (False, st.data_id, spdy.FLAG_FIN, b"")
