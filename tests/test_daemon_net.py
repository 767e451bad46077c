"""The daemon's network layer: TUN flows, routes, DNS, resolv.conf, crash recovery.

``unit`` tests are pure logic.  ``netns`` tests need root: each creates a
private network namespace (no link to the outside), runs a script inside it
with ``ip netns exec``, and deletes the namespace afterwards - nothing is
ever changed in the host's own namespace.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from dnslib import AAAA, PTR, QTYPE, RR, SRV, A, DNSRecord

from tpnb.daemon import routes as routes_mod
from tpnb.daemon.dns import ClusterResolver, DNSServer, query
from tpnb.daemon.netstate import StateFile
from tpnb.daemon.resolvconf import MARKER, ResolvConf, embedded_original, parse, start_ticks, writer_pid
from tpnb.daemon.tun import Flow, servfail, udp_fit

# ======================================================================= unit
# ---------------------------------------------------------------- fake cluster DNS
ZONE = {
    ("hello.default.svc.cluster.local", "A"): "10.43.0.20",
    ("hello.default.svc.cluster.local", "AAAA"): None,  # exists, no AAAA
    ("web.team.svc.cluster.local", "A"): "10.43.0.30",
    ("hello.team.svc.cluster.local", "A"): "10.43.0.31",
    ("db.other.svc.cluster.local", "A"): "10.43.0.40",
    ("_http._tcp.hello.default.svc.cluster.local", "SRV"): "hello.default.svc.cluster.local",
    ("20.0.43.10.in-addr.arpa", "PTR"): "hello.default.svc.cluster.local",
}


class FakeCluster:
    """A `lookup` coroutine answering from ZONE with dnslib-built replies."""

    def __init__(self, ttl: int = 5) -> None:
        self.asked: list[tuple[str, str]] = []
        self.ttl = ttl
        self.fail = False

    async def __call__(self, raw: bytes) -> bytes:
        q = DNSRecord.parse(raw)
        name, qt = str(q.q.qname).rstrip("."), QTYPE[q.q.qtype]
        self.asked.append((name, qt))
        if self.fail:
            raise ConnectionError("manager unreachable")
        r = q.reply()
        if (name, qt) in ZONE:
            val = ZONE[(name, qt)]
            if val is not None:
                rdata = {"A": lambda v: A(v), "AAAA": lambda v: AAAA(v), "PTR": lambda v: PTR(v),
                         "SRV": lambda v: SRV(0, 100, 80, v)}[qt](val)
                r.add_answer(RR(name, q.q.qtype, rdata=rdata, ttl=self.ttl))
        elif not any(n == name for n, _ in ZONE):
            r.header.rcode = 3  # NXDOMAIN
        return r.pack()


def make_resolver(lookup: FakeCluster, **kw: object) -> ClusterResolver:
    args: dict = dict(namespaces={"default", "team", "other", "kube-system"},
                      mapped_namespaces=["default", "team"], fallback=[], search=["corp.example"],
                      subnets=["10.42.0.0/16", "10.43.0.0/16"])
    args.update(kw)
    return ClusterResolver(lookup, **args)  # type: ignore[arg-type]


def ask(res: ClusterResolver, name: str, qtype: str = "A") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    raw = asyncio.run(res.handle(q.pack()))
    r = DNSRecord.parse(raw)
    assert r.header.id == q.header.id
    assert str(r.q.qname) == str(q.q.qname), "reply must carry the exact question"
    return r


@pytest.mark.unit
def test_name_rules() -> None:
    res = make_resolver(FakeCluster())
    cn = res.cluster_names
    assert cn("hello.default.svc.cluster.local.") == ["hello.default.svc.cluster.local"]
    assert cn("Hello.Default.SVC.cluster.local") == ["hello.default.svc.cluster.local"]
    assert cn("hello.default") == ["hello.default.svc.cluster.local"]
    assert cn("hello.default.svc") == ["hello.default.svc.cluster.local"]
    assert cn("hello") == ["hello.default.svc.cluster.local", "hello.team.svc.cluster.local"]
    assert cn("_http._tcp.hello") == ["_http._tcp.hello.default.svc.cluster.local",
                                      "_http._tcp.hello.team.svc.cluster.local"]
    assert cn("hello.nosuchns") is None            # not a namespace: upstream
    assert cn("example.com") is None
    assert cn("www.google.com") is None
    assert cn("20.0.43.10.in-addr.arpa") == ["20.0.43.10.in-addr.arpa"]
    assert cn("1.1.168.192.in-addr.arpa") is None  # not a cluster subnet
    assert cn("43.10.in-addr.arpa") is None        # partial reverse name
    assert cn("") is None
    res.set_mapped_namespaces([])
    assert cn("hello") is None                     # nothing mapped: upstream decides
    # namespaces may be a callable (the manager's live list)
    live = {"a"}
    res2 = ClusterResolver(FakeCluster(), namespaces=lambda: live)
    assert res2.cluster_names("x.a") == ["x.a.svc.cluster.local"]
    live.add("b")
    assert res2.cluster_names("x.b") == ["x.b.svc.cluster.local"]
    assert res.search_domains() == ["corp.example"]
    res.set_mapped_namespaces(["team"])
    assert res.search_domains() == ["team.svc.cluster.local", "corp.example"]


@pytest.mark.unit
def test_dns_cluster_answers_and_rewrites() -> None:
    fake = FakeCluster()
    res = make_resolver(fake)
    r = ask(res, "hello.default.svc.cluster.local")
    assert r.header.rcode == 0 and str(r.rr[0].rdata) == "10.43.0.20"
    # svc.ns: asked as FQDN in the cluster, answered under the asked name
    r = ask(res, "hello.default")
    assert [str(rr.rname) for rr in r.rr] == ["hello.default."]
    assert str(r.rr[0].rdata) == "10.43.0.20"
    r = ask(res, "web.team.svc")
    assert str(r.rr[0].rname) == "web.team.svc." and str(r.rr[0].rdata) == "10.43.0.30"
    # single label: mapped namespaces in order
    r = ask(res, "hello")
    assert str(r.rr[0].rname) == "hello." and str(r.rr[0].rdata) == "10.43.0.20"
    r = ask(res, "web")  # not in default, found in team
    assert str(r.rr[0].rdata) == "10.43.0.30"
    res.set_mapped_namespaces(["team", "default"])
    assert str(ask(res, "hello").rr[0].rdata) == "10.43.0.31"
    # NODATA stops the search (the name exists in the first namespace)
    res.set_mapped_namespaces(["default", "team"])
    r = ask(res, "hello", "AAAA")
    assert r.header.rcode == 0 and not r.rr
    # db is only in "other", which is not mapped
    assert ask(res, "db").header.rcode == 3
    assert str(ask(res, "db.other").rr[0].rdata) == "10.43.0.40"
    # SRV and PTR
    r = ask(res, "_http._tcp.hello", "SRV")
    assert r.rr[0].rdata.port == 80 and str(r.rr[0].rname) == "_http._tcp.hello."
    r = ask(res, "20.0.43.10.in-addr.arpa", "PTR")
    assert str(r.rr[0].rdata) == "hello.default.svc.cluster.local."


@pytest.mark.unit
def test_dns_nxdomain_fast_and_errors() -> None:
    fake = FakeCluster()
    res = make_resolver(fake)
    t0 = time.monotonic()
    assert ask(res, "nosuch.default.svc.cluster.local").header.rcode == 3
    assert ask(res, "nosuch.default").header.rcode == 3
    assert ask(res, "nosuch").header.rcode == 3
    assert time.monotonic() - t0 < 0.5
    # no fallback resolvers: refused quickly, never a hang
    t0 = time.monotonic()
    assert ask(res, "example.com").header.rcode == 5
    assert time.monotonic() - t0 < 0.5
    # manager down: SERVFAIL, not an exception
    fake.fail = True
    assert ask(res, "web.team").header.rcode == 2
    # garbage in: an error out, never a raise
    assert asyncio.run(res.handle(b"\x12\x34garbage-garbage")) [:2] == b"\x12\x34"
    assert asyncio.run(res.handle(b"")) == b""


@pytest.mark.unit
def test_dns_cache_respects_ttl() -> None:
    fake = FakeCluster(ttl=1)
    res = make_resolver(fake)
    ask(res, "hello.default")
    ask(res, "hello.default")
    assert fake.asked.count(("hello.default.svc.cluster.local", "A")) == 1
    assert res.stats["cache_hits"] == 1
    time.sleep(1.1)
    ask(res, "hello.default")
    assert fake.asked.count(("hello.default.svc.cluster.local", "A")) == 2
    # TTL capped at max_ttl; negative answers are not cached
    fake2 = FakeCluster(ttl=3600)
    res2 = make_resolver(fake2, max_ttl=30)
    ask(res2, "hello.default")
    (expires, _), = res2._cache.values()
    assert expires - time.monotonic() <= 30
    ask(res2, "nosuch.default")
    ask(res2, "nosuch.default")
    assert fake2.asked.count(("nosuch.default.svc.cluster.local", "A")) == 2


@pytest.mark.unit
def test_dns_fallback_and_server() -> None:
    """Fallback over UDP to a fake upstream on loopback; DNSServer over UDP+TCP."""

    async def main() -> None:
        upstream_seen: list[str] = []

        class Upstream(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                q = DNSRecord.parse(data)
                upstream_seen.append(str(q.q.qname))
                r = q.reply()
                r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("93.184.216.34"), ttl=60))
                self.t.sendto(r.pack(), addr)  # type: ignore[attr-defined]

        loop = asyncio.get_running_loop()
        ut, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
        uport = ut.get_extra_info("sockname")[1]
        # a dead resolver first: the live one must still answer within the budget
        res = make_resolver(FakeCluster(), fallback=["127.0.0.1:9", f"127.0.0.1:{uport}"])
        server = DNSServer(res, "127.0.0.1", 0)
        await server.start()
        try:
            addr = f"127.0.0.1:{server.port}"
            r = await query(addr, "example.com")
            assert str(r.rr[0].rdata) == "93.184.216.34" and upstream_seen == ["example.com."]
            r = await query(addr, "hello.default", tcp=True)
            assert str(r.rr[0].rdata) == "10.43.0.20"
            r = await query(addr, "hello")
            assert str(r.rr[0].rdata) == "10.43.0.20"
            # a single label the cluster does not know: upstream may (a LAN name)
            r = await query(addr, "printer")
            assert str(r.rr[0].rdata) == "93.184.216.34" and upstream_seen[-1] == "printer."
            # but a cluster-shaped name the cluster does not know never leaks upstream
            r = await query(addr, "nosuch.default")
            assert r.header.rcode == 3 and upstream_seen[-1] == "printer."
            # unreachable fallback: SERVFAIL after ~2 s, not a hang
            res.fallback = ["127.0.0.1:9"]
            t0 = time.monotonic()
            r = await query(addr, "example.org", timeout=5)
            assert r.header.rcode == 2 and time.monotonic() - t0 < 3
        finally:
            await server.stop()
            ut.close()

    asyncio.run(main())


@pytest.mark.unit
def test_servfail_and_udp_fit() -> None:
    q = DNSRecord.question("a.example", "A")
    sf = DNSRecord.parse(servfail(q.pack()))
    assert sf.header.id == q.header.id and sf.header.rcode == 2 and str(sf.q.qname) == "a.example."
    big = q.reply()
    for i in range(60):
        big.add_answer(RR("a.example", QTYPE.A, rdata=A(f"10.0.0.{i}")))
    raw = big.pack()
    assert len(raw) > 512
    cut = DNSRecord.parse(udp_fit(q.pack(), raw))
    assert cut.header.tc and not cut.rr and str(cut.q.qname) == "a.example."
    q.add_ar(__import__("dnslib").EDNS0(udp_len=4096))
    assert udp_fit(q.pack(), raw) == raw


@pytest.mark.unit
def test_flow_wraps_stream() -> None:
    class FakeStream:
        def __init__(self) -> None:
            self.calls: list[str] = []

        async def read(self, n: int) -> bytes:
            return b"data"

        def write(self, b: bytes) -> None:
            self.calls.append(f"write {b!r}")

        async def drain(self) -> None:
            self.calls.append("drain")

        def write_eof(self) -> None:
            self.calls.append("eof")

        def close(self) -> None:
            self.calls.append("close")

    async def main() -> None:
        s = FakeStream()
        f = Flow("tcp", ("169.254.0.1", 1234), ("10.99.1.2", 80), s)
        assert await f.read() == b"data"
        f.write(b"x")
        await f.drain()
        f.write_eof()
        f.close()
        f.close()
        assert s.calls == ["write b'x'", "drain"]  # FIN deferred: the stream is brand new
        await asyncio.sleep(0.1)
        assert s.calls == ["write b'x'", "drain", "eof", "close"]
        assert await f.read() == b""
        f.write(b"late")  # ignored after close
        assert "write b'late'" not in s.calls

    asyncio.run(main())


@pytest.mark.unit
def test_resolvconf_install_restore(tmp_path: Path) -> None:
    original = b"# managed by dhcp\nnameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch corp.example lab.example\noptions ndots:2 timeout:1\n"
    path = tmp_path / "resolv.conf"
    path.write_bytes(original)
    ino = path.stat().st_ino
    state = tmp_path / "state"
    rc = ResolvConf(str(path), state)
    assert rc.original_nameservers() == ["192.0.2.1", "192.0.2.2"]
    assert rc.original_search() == ["corp.example", "lab.example"]
    rc.install("169.254.53.53", ["default.svc.cluster.local", *rc.original_search()])
    text = path.read_text()
    assert text.startswith(MARKER)
    assert parse(text)[0] == ["169.254.53.53"]
    assert parse(text)[1] == ["default.svc.cluster.local", "corp.example", "lab.example"]
    assert "options ndots:2 timeout:1" in text
    assert path.stat().st_ino == ino, "must be rewritten in place (bind mounts)"
    # originals still come from the backup while installed
    assert rc.original_nameservers() == ["192.0.2.1", "192.0.2.2"]
    rc.install("169.254.53.53", ["team.svc.cluster.local"])  # update keeps the first backup
    assert (state / "resolv.conf.orig").read_bytes() == original
    rc.restore()
    assert path.read_bytes() == original and path.stat().st_ino == ino
    assert not (state / "resolv.conf.orig").exists()
    rc.restore()  # idempotent


@pytest.mark.unit
def test_resolvconf_recover_stale(tmp_path: Path) -> None:
    original = b"nameserver 192.0.2.1\n"
    path = tmp_path / "resolv.conf"
    path.write_bytes(original)
    state = tmp_path / "state"
    ResolvConf(str(path), state).install("169.254.53.53", [])
    # "crash": a fresh process object recovers from the state dir alone
    assert ResolvConf.recover_stale(state) is True
    assert path.read_bytes() == original
    assert ResolvConf.recover_stale(state) is False
    # someone else rewrote the file after our crash: theirs is kept
    ResolvConf(str(path), state).install("169.254.53.53", [])
    path.write_bytes(b"nameserver 198.51.100.7\n")
    assert ResolvConf.recover_stale(state) is False
    assert path.read_bytes() == b"nameserver 198.51.100.7\n"
    assert not (state / "resolv.conf.orig").exists()
    # replaced by rename (another inode): not ours any more
    ResolvConf(str(path), state).install("169.254.53.53", [])
    tmp = tmp_path / "new"
    tmp.write_bytes(MARKER.encode() + b" but not ours\n")
    os.replace(tmp, path)
    assert ResolvConf.recover_stale(state) is False
    # a dead daemon's file without a backup or embedded copy is no source of fallback servers
    path.write_bytes(MARKER.encode() + b"\nnameserver 169.254.53.53\n")
    assert ResolvConf(str(path), tmp_path / "empty").original_nameservers() == []


@pytest.mark.unit
def test_resolvconf_survives_lost_backup(tmp_path: Path) -> None:
    """Reboot while connected: /run (the backup) is gone, /etc/resolv.conf is not."""
    original = b"# odd bytes \xc3\xa9 kept\nnameserver 192.0.2.1\nsearch a.example\n\n"
    path = tmp_path / "resolv.conf"
    path.write_bytes(original)
    state = tmp_path / "state"
    rc = ResolvConf(str(path), state)
    rc.install("169.254.53.53", ["default.svc.cluster.local"])
    data = path.read_bytes()
    assert embedded_original(data) == original
    assert writer_pid(data) == (os.getpid(), start_ticks(os.getpid()))
    shutil.rmtree(state)  # the tmpfs is gone
    # a new daemon still sees the real upstream resolvers
    fresh = ResolvConf(str(path), tmp_path / "state2")
    assert fresh.original_nameservers() == ["192.0.2.1"] and fresh.original_search() == ["a.example"]
    # ... and reinstalling keeps the true original, not the dead daemon's file
    fresh.install("169.254.53.53", [])
    fresh.restore()
    assert path.read_bytes() == original
    # recovery from the embedded copy, refused while the writer is alive
    rc2 = ResolvConf(str(path), tmp_path / "state3")
    rc2.install("169.254.53.53", [])
    shutil.rmtree(tmp_path / "state3")
    ppid = os.getppid()
    live = path.read_bytes().replace(f"pid {os.getpid()}, start {start_ticks(os.getpid())}".encode(),
                                     f"pid {ppid}, start {start_ticks(ppid)}".encode())
    path.write_bytes(live)
    assert ResolvConf.recover_file(str(path)) is False
    path.write_bytes(live.replace(f"pid {ppid},".encode(), b"pid 999999999,"))  # dead writer
    assert ResolvConf.recover_file(str(path)) is True
    assert path.read_bytes() == original
    assert ResolvConf.recover_file(str(path)) is False  # not ours any more


@pytest.mark.unit
def test_netstate_round_trip(tmp_path: Path) -> None:
    sf = StateFile(tmp_path)
    assert sf.load() is None
    sf.record_tun("tpnb0")
    sf.record_routes(["10.43.0.0/16", "10.42.0.0/16"])
    sf.record_routes(["10.42.0.0/16", "169.254.53.53/32"])
    sf.record_address("10.99.255.1/32")
    rc = ResolvConf(str(tmp_path / "r"), tmp_path)
    sf.record_resolv(rc)
    st = StateFile(tmp_path).load()
    assert st is not None
    assert st.tun_name == "tpnb0" and st.pid == os.getpid()
    assert st.routes == ["10.42.0.0/16", "10.43.0.0/16", "169.254.53.53/32"]
    assert st.addresses == ["10.99.255.1/32"] and st.resolv_state_dir == str(tmp_path)
    assert not st.owner_alive()  # ourselves: not "another daemon"
    sf.forget_routes(["10.43.0.0/16"])
    assert StateFile(tmp_path).load().routes == ["10.42.0.0/16", "169.254.53.53/32"]  # type: ignore[union-attr]
    # a live other process is detected; a dead or reused pid is not
    st.pid = os.getppid()
    st.pid_start = None
    assert st.owner_alive()
    st.pid_start = -1
    assert not st.owner_alive()
    (tmp_path / "state.json").write_text("{not json")
    assert StateFile(tmp_path).load() is None
    sf.clear()
    assert not (tmp_path / "state.json").exists()


@pytest.mark.unit
def test_route_conflicts() -> None:
    import ipaddress

    R = routes_mod.Route
    net = ipaddress.ip_network
    existing = [
        R(net("0.0.0.0/0"), "eth0", 2),
        R(net("10.250.0.0/24"), "eth0", 2),
        R(net("169.254.0.0/16"), "eth0", 2),
        R(net("10.42.0.0/16"), "tpnbold", 9),
        R(net("172.16.0.0/12"), "wg0", 5),
    ]
    c = routes_mod.conflicts
    assert c(net("10.43.0.0/16"), existing, "tpnb0") == []                     # default ignored
    assert [r.ifname for r in c(net("10.250.0.0/16"), existing, "tpnb0")] == ["eth0"]  # LAN inside
    assert [r.ifname for r in c(net("10.250.0.0/24"), existing, "tpnb0")] == ["eth0"]  # equal
    assert [r.ifname for r in c(net("172.20.0.0/16"), existing, "tpnb0")] == ["wg0"]   # VPN contains
    assert c(net("169.254.53.53/32"), existing, "tpnb0") == []                 # link-local container ok
    assert c(net("10.42.0.0/16"), existing, "tpnb0") == []                     # stale tpnb route: replace
    assert c(net("fd00::/64"), existing, "tpnb0") == []


# ======================================================================= netns
ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun",
)


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def netns(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private network namespace with only loopback, and a resolv.conf of its own.

    /etc/netns/<name>/resolv.conf is what `ip netns exec` bind-mounts over
    /etc/resolv.conf inside; both are removed afterwards, as is the
    namespace's /run/tpnb/<inode> state dir.
    """
    name = f"tpnbtest-{uuid.uuid4().hex[:8]}"
    etc = Path("/etc/netns") / name
    sh("ip", "netns", "add", name)
    state_dir: Path | None = None
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_bytes(b"# test resolver\nnameserver 192.0.2.53\nsearch example.test\n")
        ino = os.stat(f"/run/netns/{name}").st_ino
        state_dir = Path("/run/tpnb") / str(ino)
        yield name
    finally:
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # only processes inside our own test namespace
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)
        try:
            etc.parent.rmdir()
        except OSError:
            pass
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)


SCRIPT = textwrap.dedent(r'''
    import asyncio, json, os, socket, struct, sys, time
    from dnslib import A, QTYPE, RR, DNSRecord
    from tpnb.daemon.tun import Tun
    from tpnb.daemon import routes
    from tpnb.daemon.dns import query
    from tpnb.daemon.netstate import StateFile, recover
    from tpnb.daemon.resolvconf import ResolvConf

    DNS_IP = "169.254.53.53"
    mode = sys.argv[1]
    out = {}

    async def on_tcp(flow):
        out.setdefault("tcp", []).append([flow.src, flow.dst])
        if flow.dst[1] == 81:
            raise RuntimeError("handler bug")  # must only close this flow
        if flow.dst[1] == 82:
            return  # immediate close: the client must still see EOF
        while data := await flow.read():
            flow.write(data.upper())
            await flow.drain()
        flow.write_eof()

    async def on_udp(flow):
        out.setdefault("udp", []).append([flow.src, flow.dst])
        if flow.dst[1] == 5001:  # one datagram per handler run, then give up
            flow.write(b"once:" + await flow.read())
            return
        if flow.dst[1] == 5002:
            await flow.read()
            raise RuntimeError("udp handler bug")
        while data := await flow.read():
            flow.write(b"echo:" + data)

    async def dns_handler(raw):
        q = DNSRecord.parse(raw)
        r = q.reply()
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("10.99.7.7"), ttl=5))
        return r.pack()

    async def flows():
        async with Tun("tpnbt0", on_tcp, on_udp, dns_ip=DNS_IP, dns_handler=dns_handler) as tun:
            out["added"] = await routes.add_routes("tpnbt0", ["10.99.0.0/16", DNS_IP + "/32", "10.250.0.0/24"])
            await routes.add_address("tpnbt0", "10.99.255.1/32")
            # TCP echo both ways, with a payload larger than one read
            r, w = await asyncio.open_connection("10.99.1.2", 80)
            payload = os.urandom(300_000).hex().encode()
            w.write(payload); await w.drain(); w.write_eof()
            got = await asyncio.wait_for(r.read(), 20)
            out["tcp_echo_ok"] = got == payload.upper()
            w.close()
            # a failing handler closes its flow, the interface lives on
            r, w = await asyncio.open_connection("10.99.1.2", 81)
            out["bug_eof"] = await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            # handlers that return at once: no lost FIN
            hung = 0
            for _ in range(50):
                r, w = await asyncio.open_connection("10.99.1.3", 82)
                try:
                    await asyncio.wait_for(r.read(), 2)
                except asyncio.TimeoutError:
                    hung += 1
                w.close()
            out["early_close_hung"] = hung
            # UDP
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
            s.sendto(b"ping", ("10.99.2.3", 5000))
            loop = asyncio.get_running_loop()
            out["udp_reply"] = (await asyncio.wait_for(loop.sock_recv(s, 100), 5)).decode()
            s.close()
            # a UDP handler that ended must not black-hole the pair: the next
            # datagram (same socket) runs the handler again
            for port in (5001, 5002):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
                await loop.sock_connect(s, ("10.99.2.4", port))
                got = []
                for i in range(3):
                    await loop.sock_sendall(s, b"n%d" % i)
                    if port == 5001:
                        got.append((await asyncio.wait_for(loop.sock_recv(s, 100), 5)).decode())
                    else:
                        await asyncio.sleep(0.1)
                out["udp_%d" % port] = got
                s.close()
            # DNS over UDP and TCP to the DNS IP
            r = await query(DNS_IP, "anything.default")
            out["dns_udp"] = str(r.rr[0].rdata)
            r = await query(DNS_IP, "other.default", tcp=True)
            out["dns_tcp"] = str(r.rr[0].rdata)
            out["routes_up"] = sorted(str(x.dst) for x in await routes.list_routes(socket.AF_INET) if x.ifname == "tpnbt0")
            await routes.remove_routes("tpnbt0", ["10.99.0.0/16"])
            out["routes_after_remove"] = sorted(str(x.dst) for x in await routes.list_routes(socket.AF_INET) if x.ifname == "tpnbt0")
            await routes.add_routes("tpnbt0", ["10.99.0.0/16"])
        out["links_after"] = await routes.tun_links()
        out["routes_after"] = sorted(str(x.dst) for x in await routes.list_routes())

    async def crash():
        from tpnb.daemon.redirect import KernelTcp
        sf = StateFile()
        rc = ResolvConf()
        sf.record_tun("tpnbt1")
        async with Tun("tpnbt1", on_tcp, on_udp):
            sf.record_routes(["10.99.0.0/16"])
            await routes.add_routes("tpnbt1", ["10.99.0.0/16"])
            sf.record_nft_table("tpnbt1")
            kt = await KernelTcp("tpnbt1", on_tcp).__aenter__()
            await kt.redirect(["10.99.0.0/16"])
            sf.record_resolv(rc)
            rc.install(DNS_IP, ["default.svc.cluster.local"] + rc.original_search())
            print("READY", flush=True)
            await asyncio.sleep(600)

    async def do_recover():
        out["recovered"] = await recover()
        out["links"] = await routes.tun_links()
        out["routes"] = sorted(str(x.dst) for x in await routes.list_routes())
        out["again"] = await recover()

    async def stale():
        # a persistent TUN (as left by a stuck or foreign process) with a route
        os.system("ip tuntap add dev tpnbstale0 mode tun && ip link set tpnbstale0 up "
                  "&& ip route add 10.98.0.0/16 dev tpnbstale0 && ip tuntap add dev other0 mode tun")
        out["before"] = await routes.tun_links()
        out["removed"] = await routes.cleanup_stale()
        out["after"] = await routes.tun_links("")
        out["routes"] = sorted(str(x.dst) for x in await routes.list_routes())

    async def e2e():
        """glibc -> resolv.conf -> TUN DNS IP -> ClusterResolver -> (fake) cluster, then connect."""
        from tpnb.daemon.dns import ClusterResolver

        async def lookup(raw):
            q = DNSRecord.parse(raw)
            r = q.reply()
            if str(q.q.qname) == "hello.default.svc.cluster.local." and q.q.qtype == QTYPE.A:
                r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("10.99.3.4"), ttl=5))
            elif not str(q.q.qname).startswith("hello.default.svc"):
                r.header.rcode = 3
            return r.pack()

        class Upstream(asyncio.DatagramProtocol):
            """The machine's original resolver (127.0.0.53 in this namespace)."""
            def connection_made(self, t):
                self.t = t
            def datagram_received(self, data, addr):
                q = DNSRecord.parse(data)
                r = q.reply()
                if str(q.q.qname) == "www.example.test." and q.q.qtype == QTYPE.A:
                    r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.80"), ttl=60))
                elif str(q.q.qname) != "www.example.test.":
                    r.header.rcode = 3
                self.t.sendto(r.pack(), addr)

        up, _ = await asyncio.get_running_loop().create_datagram_endpoint(Upstream, local_addr=("127.0.0.53", 53))
        rc = ResolvConf()
        res = ClusterResolver(lookup, namespaces={"default"}, mapped_namespaces=["default"],
                              fallback=rc.original_nameservers(), search=rc.original_search(),
                              subnets=["10.99.0.0/16"])
        async with Tun("tpnbt2", on_tcp, on_udp, dns_ip=DNS_IP, dns_handler=res.handle):
            await routes.add_routes("tpnbt2", ["10.99.0.0/16", DNS_IP + "/32"])
            rc.install(DNS_IP, res.search_domains())
            try:
                loop = asyncio.get_running_loop()
                for name in ("hello", "hello.default", "hello.default.svc.cluster.local",
                             "www.example.test", "www"):
                    infos = await loop.getaddrinfo(name, 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
                    out[name] = infos[0][4][0]
                t0 = time.monotonic()
                try:
                    await loop.getaddrinfo("nosuch.default", 80, family=socket.AF_INET)
                except socket.gaierror as exc:
                    out["nosuch"] = exc.errno
                out["nosuch_seconds"] = time.monotonic() - t0
                r, w = await asyncio.open_connection("hello.default", 80)
                w.write(b"hi"); w.write_eof()
                out["reply"] = (await asyncio.wait_for(r.read(), 5)).decode()
                w.close()
                out["stats"] = res.stats
            finally:
                rc.restore()
                up.close()

    async def kernel():
        """TCP to a routed subnet, redirected by nftables to the daemon's socket."""
        from tpnb.daemon.redirect import KernelTcp
        async with Tun("tpnbt4", on_tcp, on_udp) as tun:
            await routes.add_routes("tpnbt4", ["10.99.0.0/16"])
            async with KernelTcp("tpnbt4", on_tcp) as kt:
                await kt.redirect(["10.99.0.0/16"])
                out["ruleset"] = os.popen("nft list ruleset").read()
                r, w = await asyncio.open_connection("10.99.1.2", 8080)
                w.write(b"hello kernel")
                w.write_eof()
                out["echo"] = (await asyncio.wait_for(r.read(), 5)).decode()
                w.close()
                # a direct connection to the redirect port is not a cluster flow
                r, w = await asyncio.open_connection("127.0.0.1", kt.port)
                out["direct"] = (await asyncio.wait_for(r.read(), 5)).decode()
                w.close()
                await asyncio.sleep(0.2)
                out["active"] = kt.active_flows
            out["ruleset_after"] = os.popen("nft list ruleset").read()

    async def fail_inside():
        async with Tun("tpnbt3", on_tcp, on_udp):
            raise RuntimeError("boom inside the block")

    asyncio.run({"flows": flows, "crash": crash, "recover": do_recover, "stale": stale,
                 "e2e": e2e, "raise": fail_inside, "kernel": kernel}[mode]())
    print("RESULT " + json.dumps(out), flush=True)
''')


def _script(tmp_path: Path) -> Path:
    """SCRIPT as a file (it runs inside a namespace with `ip netns exec`)."""
    path = tmp_path / "net_script.py"
    path.write_text(SCRIPT)
    return path


def run_in(ns: str, script: Path, mode: str, timeout: float = 120) -> dict:
    p = sh("ip", "netns", "exec", ns, PY, str(script), mode, check=False, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return json.loads(lines[-1][7:])


@pytest.mark.netns
@needs_root
def test_tun_flows_routes_dns(netns: str, tmp_path: Path) -> None:
    script = _script(tmp_path)
    # a LAN route that a cluster CIDR must not steal
    # (a veth pair with both ends inside the test namespace: no way out)
    sh("ip", "-n", netns, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    sh("ip", "-n", netns, "addr", "add", "10.250.0.2/24", "dev", "lan0")
    sh("ip", "-n", netns, "link", "set", "lan1", "up")
    sh("ip", "-n", netns, "link", "set", "lan0", "up")
    out = run_in(netns, script, "flows")
    assert out["added"] == ["10.99.0.0/16", "169.254.53.53/32"], "10.250.0.0/24 overlaps lan0: skipped"
    assert out["tcp_echo_ok"] is True
    assert out["tcp"][0][1] == ["10.99.1.2", 80]
    assert out["tcp"][0][0][0] == "10.99.255.1" or out["tcp"][0][0][0] == "169.254.0.1"
    assert out["bug_eof"] is True
    assert out["early_close_hung"] == 0
    assert out["udp_reply"] == "echo:ping" and out["udp"][0][1] == ["10.99.2.3", 5000]
    assert out["udp_5001"] == ["once:n0", "once:n1", "once:n2"]
    assert sum(1 for f in out["udp"] if f[1][1] == 5001) == 3
    assert sum(1 for f in out["udp"] if f[1][1] == 5002) == 3, "a raising handler is restarted too"
    assert out["dns_udp"] == "10.99.7.7" and out["dns_tcp"] == "10.99.7.7"
    assert not any(d[1][1] == 53 for d in out.get("udp", [])), "DNS must not reach on_udp"
    assert out["routes_up"] == ["10.99.0.0/16", "169.254.53.53/32"]
    assert out["routes_after_remove"] == ["169.254.53.53/32"]
    assert out["links_after"] == []
    assert not any(r.startswith("10.99.") or r.startswith("169.254.53") for r in out["routes_after"])
    assert "10.250.0.0/24" in out["routes_after"]


@pytest.mark.netns
@needs_root
@pytest.mark.parametrize("wipe_run", [False, True], ids=["state-kept", "state-wiped"])
def test_crash_then_recover(netns: str, tmp_path: Path, wipe_run: bool) -> None:
    """kill -9 while connected; the next start undoes everything.

    ``state-wiped`` also deletes /run/tpnb/<netns> (as a reboot would):
    resolv.conf must still come back, from the copy embedded in it.
    """
    script = _script(tmp_path)
    resolv = Path("/etc/netns") / netns / "resolv.conf"
    original = resolv.read_bytes()
    proc = subprocess.Popen(["ip", "netns", "exec", netns, PY, str(script), "crash"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read() if proc.stderr else line
        assert resolv.read_bytes().startswith(MARKER.encode())
        assert "tpnbt1" in sh("ip", "-n", netns, "link").stdout
        assert "10.99.0.0/16" in sh("ip", "-n", netns, "route").stdout
        assert "table ip tpnbt1" in sh("ip", "netns", "exec", netns, "nft", "list", "ruleset").stdout
        proc.send_signal(signal.SIGKILL)  # ip netns exec execs python: this is the daemon
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if wipe_run:
        shutil.rmtree(Path("/run/tpnb") / str(os.stat(f"/run/netns/{netns}").st_ino))
    out = run_in(netns, script, "recover")
    assert any(d.startswith("resolv.conf /etc/resolv.conf") for d in out["recovered"]), out
    assert out["links"] == [] and not any(r.startswith("10.99.") for r in out["routes"])
    assert out["again"] == []
    assert resolv.read_bytes() == original
    assert "tpnb" not in sh("ip", "-n", netns, "link").stdout
    assert "10.99." not in sh("ip", "-n", netns, "route").stdout
    assert "tpnb" not in sh("ip", "netns", "exec", netns, "nft", "list", "ruleset").stdout


@pytest.mark.netns
@needs_root
def test_kernel_tcp_redirect(netns: str, tmp_path: Path) -> None:
    """The kernel-TCP path: the handler gets the original destination; the rules go with the block."""
    script = _script(tmp_path)
    out = run_in(netns, script, "kernel")
    assert "table ip tpnbt4" in out["ruleset"] and "redirect to" in out["ruleset"]
    assert out["echo"] == "HELLO KERNEL"
    assert out["tcp"][0][1] == ["10.99.1.2", 8080]  # SO_ORIGINAL_DST
    assert len(out["tcp"]) == 1, "the direct connection to the redirect port reached the handler"
    assert out["direct"] == "" and out["active"] == 0
    assert "tpnbt4" not in out["ruleset_after"]


@pytest.mark.netns
@needs_root
def test_cleanup_stale_persistent_tun(netns: str, tmp_path: Path) -> None:
    script = _script(tmp_path)
    out = run_in(netns, script, "stale")
    assert out["before"] == ["tpnbstale0"]
    assert out["removed"] == ["tpnbstale0"]
    assert out["after"] == ["other0"], "only tpnb-prefixed TUNs are removed"
    assert "10.98.0.0/16" not in out["routes"]


@pytest.mark.netns
@needs_root
def test_system_resolver_end_to_end(netns: str, tmp_path: Path) -> None:
    """getaddrinfo() in the namespace resolves cluster names through the TUN's DNS IP."""
    script = _script(tmp_path)
    resolv = Path("/etc/netns") / netns / "resolv.conf"
    original = b"nameserver 127.0.0.53\nsearch example.test\n"
    resolv.write_bytes(original)
    out = run_in(netns, script, "e2e")
    assert out["hello"] == out["hello.default"] == out["hello.default.svc.cluster.local"] == "10.99.3.4"
    # non-cluster names go to the original resolver, search list included
    assert out["www.example.test"] == out["www"] == "192.0.2.80"
    assert out["nosuch"] == socket.EAI_NONAME and out["nosuch_seconds"] < 1.0
    assert out["reply"] == "HI"
    assert resolv.read_bytes() == original


@pytest.mark.netns
@needs_root
def test_exception_inside_tun_block_is_clean(netns: str, tmp_path: Path) -> None:
    """An exception escaping `async with Tun` must be a traceback, not a segfault."""
    script = _script(tmp_path)
    for _ in range(3):
        p = sh("ip", "netns", "exec", netns, PY, str(script), "raise", check=False, timeout=60)
        assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
        assert "boom inside the block" in p.stderr
    assert "tpnbt3" not in sh("ip", "-n", netns, "link").stdout
