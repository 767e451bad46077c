"""The traffic-agent: a sidecar that sits between a Service and its app.

`python3 -m tpnb.cluster agent` in the `traffic-agent` container that
connector/agent_injector.py adds to a workload.  The Service's target port now
points at AGENT_PORT; every connection accepted there goes either

  * to the traffic-manager (`AgentHub.Tunnel`, kind AGENT_INTERCEPTED) when
    the manager's current instructions hold an ACTIVE intercept for us -- the
    manager hands it to the intercepting client; or
  * to the app on 127.0.0.1:APP_PORT (same pod, same network namespace).

The agent arrives with its pod's projected ServiceAccount token (audience
tpnb-traffic-manager; cluster/agent_auth.py checks it).  Nothing but the
traffic port listens on the pod network: the file service (cluster/sftp.py) is
on the pod's loopback, and the manager asks us (WatchAgentDials) to connect it
to a tunnel for the session that holds the intercept.

The workload must never break because of us: when the manager is unreachable,
restarting, or has never been installed, the agent forgets its instructions
and forwards everything to the app, while re-arriving in the background.

Environment reported to the manager (`AgentInfo.environment`) is what
`kubectl exec POD -c APP -- env` shows: read from /proc/<pid>/environ of the
app container's main process (the pod has shareProcessNamespace: true, set by
the injector).  If that process cannot be read (another uid and no
CAP_SYS_PTRACE), the injector's fallback copies are used: the app's `env`
entries and `envFrom` sources, renamed with the `TPNB_APP_ENV_` prefix.

Personal intercepts (HTTP filters) are routed request by request by
cluster/httproute.py (HTTP/1.1), stream by stream by cluster/h2route.py (HTTP/2
with prior knowledge, as gRPC speaks it): matching requests to the holder's
tunnel, the rest to the app.  A global intercept takes whole connections, as before.
Wiretaps (cluster/wiretap.py) copy what the app serves: HTTP/1.1 requests from
the router, HTTP/2 streams decoded from a copy of the connection's bytes; the
app's answers never wait for the copy.

Runs inside the cluster image: Python 3.11, grpcio, protobuf, h11, httptools, h2 and stdlib only.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# getaddrinfo honours the pod's resolv.conf search path ("traffic-manager.tpnb");
# must be set before grpc creates its first channel.
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")

import grpc  # noqa: E402

from tpnb.proto import pb, rpc  # noqa: E402
from tpnb.version import __version__  # noqa: E402

from . import h2route, httproute, relay  # noqa: E402
from .agentlink import AgentLinks  # noqa: E402
from tpnb.common.linkframes import LinkChannel  # noqa: E402
from .wiretap import Wiretaps  # noqa: E402
from .sftpjail import FilteringWriter, Jail  # noqa: E402
from tpnb.common.forward import (  # noqa: E402
    BULK_GRPC_OPTIONS,
    STREAM_LIMIT,
    GrpcFrameChannel,
    TunnelError,
    bridge,
    cancel_channel,
)

log = logging.getLogger("tpnb.agent")

#: prefix of the injector's fallback copies of the app container's env
APP_ENV_PREFIX = "TPNB_APP_ENV_"
#: seconds between AgentRemain heartbeats
REMAIN_INTERVAL = 5.0
#: how long a connection waits for the manager to answer an intercept `open`
OPEN_TIMEOUT = 30.0
#: how long a new connection to the app may take
APP_CONNECT_TIMEOUT = 10.0
MAX_BACKOFF = 5.0  # a manager restart must not leave intercepts dead for long
#: how long a replaced manager channel stays open for connections still using it
OLD_CHANNEL_LINGER = 120.0
#: grace period for open connections after SIGTERM (the pod's default is 30 s)
DRAIN_SECONDS = 20.0


# ------------------------------------------------------------------ settings

@dataclass
class AgentSettings:
    """Everything the injector tells the agent, via its container env."""

    name: str
    namespace: str
    pod_name: str
    pod_ip: str
    app_container: str
    app_port: int
    agent_port: int = 9900
    sftp_port: int = 9902
    #: the agent link port (cluster/agentlink.py), on the pod's loopback; 0: none
    link_port: int = 9903
    #: the readiness probe's port: accepts and closes, serves nothing (a probe of the
    #: traffic port would be forwarded to the laptop while intercepted)
    health_port: int = 9901
    manager_host: str = "traffic-manager.tpnb"
    manager_port: int = 8082
    #: the projected ServiceAccount token (audience tpnb-traffic-manager) that proves who we are
    token_file: str = "/var/run/secrets/tpnb/token"
    mount_prefix: str = "/tpnb/volumes"
    mounts: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AgentSettings:
        e = dict(os.environ if env is None else env)
        missing = [k for k in ("APP_PORT",) if not e.get(k)]
        if missing:
            raise SystemExit(f"traffic-agent: missing environment variables: {', '.join(missing)}")
        try:
            mounts = json.loads(e.get("TPNB_MOUNTS") or "[]")
        except ValueError:
            mounts = []
        return cls(
            name=e.get("AGENT_NAME", ""),
            namespace=e.get("AGENT_NAMESPACE", ""),
            pod_name=e.get("AGENT_POD_NAME", socket.gethostname()),
            pod_ip=e.get("AGENT_POD_IP", ""),
            app_container=e.get("TPNB_CONTAINER", ""),
            app_port=int(e["APP_PORT"]),
            agent_port=int(e.get("AGENT_PORT") or 9900),
            sftp_port=int(e.get("AGENT_SFTP_PORT") or 9902),
            link_port=int(e.get("AGENT_LINK_PORT") or 9903),
            health_port=int(e.get("AGENT_HEALTH_PORT") or e.get("AGENT_GRPC_PORT") or 0),
            manager_host=e.get("MANAGER_HOST") or "traffic-manager.tpnb",
            manager_port=int(e.get("MANAGER_PORT") or 8082),
            token_file=e.get("TPNB_AGENT_TOKEN_FILE") or "/var/run/secrets/tpnb/token",
            mount_prefix=e.get("TPNB_MOUNT_PREFIX") or "/tpnb/volumes",
            mounts=[str(m) for m in mounts] if isinstance(mounts, list) else [],
        )


# ------------------------------------------------------------------ the app's environment

def parse_environ(raw: bytes) -> dict[str, str]:
    """/proc/<pid>/environ: NUL-separated KEY=VALUE entries."""
    out: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        if not entry or b"=" not in entry:
            continue
        k, _, v = entry.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return out


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    """Socket inodes listening on TCP `port` in our network namespace (= the pod's)."""
    inodes: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":  # 0A = LISTEN
                continue
            try:
                lport = int(parts[1].rsplit(":", 1)[1], 16)
            except (IndexError, ValueError):
                continue
            if lport == port:
                inodes.add(parts[9])
    return inodes


@dataclass
class _Proc:
    pid: int
    ppid: int
    argv0: str
    ours: bool


def _scan_processes(proc: Path) -> dict[int, _Proc]:
    try:
        my_mnt = os.readlink(proc / "self" / "ns" / "mnt")
    except OSError:
        my_mnt = None
    me = os.getpid()
    out: dict[int, _Proc] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            argv0 = (d / "cmdline").read_bytes().split(b"\0", 1)[0].decode("utf-8", "replace")
        except (OSError, ValueError, IndexError):
            continue
        try:
            ours = pid == me or (my_mnt is not None and os.readlink(d / "ns" / "mnt") == my_mnt)
        except OSError:
            ours = False  # not inspectable: another container's process
        out[pid] = _Proc(pid, ppid, argv0, ours)
    return out


def find_app_pid(app_port: int, proc: Path = Path("/proc")) -> int | None:
    """The main process of the app container, seen through the shared PID namespace.

    Preferred: the process listening on APP_PORT (exactly the app even with
    other sidecars), walked up to its container's first process.  Else the
    lowest-numbered container main process that is neither ours nor the
    pod's `pause`.
    """
    procs = _scan_processes(proc)
    cands = {p.pid: p for p in procs.values()
             if not p.ours and p.argv0 and os.path.basename(p.argv0) != "pause"}
    inodes = listening_inodes(app_port, proc)
    if inodes:
        targets = {f"socket:[{i}]" for i in inodes}
        for pid in sorted(cands):
            try:
                fds = os.listdir(proc / str(pid) / "fd")
            except OSError:
                continue
            hit = False
            for fd in fds:
                try:
                    if os.readlink(proc / str(pid) / "fd" / fd) in targets:
                        hit = True
                        break
                except OSError:
                    continue
            if hit:
                while cands[pid].ppid in cands:
                    pid = cands[pid].ppid
                return pid
    roots = sorted(p.pid for p in cands.values() if p.ppid not in cands)
    return roots[0] if roots else None


_SERVICE_ENV = re.compile(r"^(KUBERNETES_.*|HOSTNAME|[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT.*|PORT(_.*)?))$")


def fallback_environment(own: dict[str, str]) -> dict[str, str]:
    """Best effort without access to the app process.

    The Kubernetes-provided variables (service links, HOSTNAME) are the same
    in every container of the pod; the app's own definitions come from the
    injector's prefixed copies.  Image ENV lines of the app are not knowable.
    """
    env = {k: v for k, v in own.items() if _SERVICE_ENV.match(k) and not k.startswith(("AGENT_", "TPNB_"))}
    for k, v in own.items():
        if k.startswith(APP_ENV_PREFIX):
            env[k[len(APP_ENV_PREFIX):]] = v
    return env


def app_environment(settings: AgentSettings, proc: Path = Path("/proc")) -> dict[str, str]:
    pid = find_app_pid(settings.app_port, proc)
    if pid is not None:
        try:
            env = parse_environ((proc / str(pid) / "environ").read_bytes())
            log.debug("app environment read from pid %d (%d variables)", pid, len(env))
            return env
        except OSError as exc:
            log.warning("cannot read the environment of app process %d (%s); using the "
                        "injector's copies instead (image ENV lines will be missing)", pid, exc)
    else:
        log.warning("app container process not found (is shareProcessNamespace on?); "
                    "using the injector's copies of its environment")
    return fallback_environment(dict(os.environ))


# ------------------------------------------------------------------ the agent

class _SessionLost(Exception):
    pass


def _ip_bytes(ip: str) -> bytes:
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(fam, ip)
        except OSError:
            continue
    return b""


class Agent:
    """Listener, manager session and per-connection routing."""

    def __init__(self, settings: AgentSettings) -> None:
        self.s = settings
        self.agent_id: str | None = None
        self.intercepts: list[pb.InterceptInfo] = []
        self.channel: grpc.aio.Channel | None = None
        self.stub: rpc.AgentHubStub | None = None
        self.server: asyncio.AbstractServer | None = None
        self.health: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._old_channels: set[Any] = set()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        #: what the app's port speaks ("" until probed; see httproute.probe), reported to the manager
        self.app_protocol = ""
        self._probe: asyncio.Task[Any] | None = None
        #: the HTTP/2 client connections being routed (told GOAWAY when the agent stops)
        self._h2: set[Any] = set()
        #: wiretaps of our workload (from the instructions), their buffers and uploader
        self.wiretaps = Wiretaps(pb, settings.pod_name)
        #: the intercepting sessions' direct links (cluster/agentlink.py)
        self.links = AgentLinks(lambda: self.intercepts)

    # ---------------------------------------------------------- routing
    def active_intercept(self) -> pb.InterceptInfo | None:
        """The ACTIVE global (unfiltered) intercept: it takes whole connections."""
        for ic in self.intercepts:
            if ic.state == pb.InterceptInfo.ACTIVE and not httproute.is_filtered(ic.spec):
                return ic
        return None

    def filtered_intercepts(self) -> list[tuple[httproute.Filter, pb.InterceptInfo]]:
        """The ACTIVE personal intercepts, once the app is known to speak HTTP/1.1 (until then, and
        for an app that does not, the app keeps its connections: the manager fails such intercepts)."""
        if self.app_protocol not in (httproute.HTTP1, h2route.H2C):
            return []
        out = []
        for ic in self.intercepts:
            if ic.state == pb.InterceptInfo.ACTIVE and httproute.is_filtered(ic.spec):
                try:
                    out.append((httproute.Filter.from_spec(ic.spec), ic))
                except re.error:
                    continue  # the manager checks them; never let a bad one break the app
        return out

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            await self._route(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one connection take the agent down
            log.exception("connection failed")
            with contextlib.suppress(Exception):
                writer.transport.abort()
        finally:
            if task is not None:
                self._conns.discard(task)

    async def _route(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        ic = self.active_intercept()
        if ic is not None and self.agent_id and self.stub is not None:
            chan = await self._open_tunnel(ic, peer)
            if chan is False:
                writer.transport.abort()  # refused: the client sees a reset
                return
            if isinstance(chan, LinkChannel):  # the agent link: joined by callbacks (cluster/agentlink.py)
                await self.links.splice(reader, writer, chan)
                return
            if chan is not None:
                up, down = await bridge(reader, writer, chan)
                log.debug("intercepted %s:%s done (%d up, %d down)", peer[0], peer[1], up, down)
                return
            # None: manager unreachable -> serve from the app
        elif (self.filtered_intercepts() or self.wiretaps) and self.agent_id and self.stub is not None:
            await self._route_http(reader, writer, peer)
            return
        await self._to_app(reader, writer, peer)

    async def _route_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          peer: tuple[Any, ...]) -> None:
        """Personal intercepts: each request to the intercept whose filter it matches, else the app."""
        def choose(req: Any) -> str:
            for flt, ic in self._filters_now():  # re-read per request: a `leave` applies at once
                if flt.matches(req.target, req.headers):
                    return ic.id
            return ""

        async def connect(key: Any) -> Any:
            if not key:
                try:
                    return await httproute.StreamUpstream.connect("127.0.0.1", self.s.app_port,
                                                                  APP_CONNECT_TIMEOUT)
                except (OSError, asyncio.TimeoutError) as exc:
                    log.warning("cannot connect to the app on 127.0.0.1:%d: %s", self.s.app_port, exc)
                    return None
            ic = next((i for i in self.intercepts if i.id == key), None)
            if ic is None or self.stub is None:
                return None
            chan = await self._open_tunnel(ic, peer)
            return httproute.TunnelUpstream(chan, pb) if chan not in (None, False) else None

        def tap(key: Any, req: Any) -> Any:  # wiretaps copy what the app serves
            return self.wiretaps.exchange(req, peer) if not key and self.wiretaps else None

        first = await h2route.sniff(reader)  # HTTP/2's preface must not reach h11 (it parses as a request line)
        if first == h2route.PREFACE and not self.filtered_intercepts():
            # only wiretaps here: HTTP/2 goes to the app untouched; a wiretap decodes a copy (wiretap.H2Copy)
            await self._to_app(reader, writer, peer, first=first, copy=self.wiretaps.wants_tcp())
            return
        async def connect_h1(key: Any) -> Any:
            if key:
                return await connect(key)
            try:  # the app as an asyncio Protocol: its answers are relayed in the callback that reads them
                return await httproute.TcpLeg.connect("127.0.0.1", self.s.app_port, APP_CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("cannot connect to the app on 127.0.0.1:%d: %s", self.s.app_port, exc)
                return None

        router: Any
        if first == h2route.PREFACE:
            router = h2route.H2Router(reader, writer, choose, connect, first=first)
            self._h2.add(router)
        else:
            router = httproute.HttpRouter(reader, writer, choose, connect_h1, first=first, tap=tap)
        try:
            await router.run()
        except httproute.NotHTTP as exc:  # not HTTP/1.1 (or h2c): the app gets it untouched
            log.debug("%s:%s is not HTTP/1.1: to the app", peer[0], peer[1])
            await self._to_app(reader, writer, peer, first=exc.raw, copy=self.wiretaps.wants_tcp())
            return
        except (ConnectionError, OSError, TunnelError) as exc:
            log.debug("%s:%s: %s", peer[0], peer[1], exc)
            writer.transport.abort()
            return
        finally:
            self._h2.discard(router)
        log.debug("%s:%s done, requests: %s", peer[0], peer[1],
                  {k or "app": n for k, n in router.routed.items()})
        with contextlib.suppress(Exception):
            writer.close()

    def _filters_now(self) -> list[tuple[httproute.Filter, pb.InterceptInfo]]:
        """filtered_intercepts(), built again only when the instructions or the app's protocol change
        (each request asks: compiling filters per request was a measurable part of its cost)."""
        cached = getattr(self, "_filters_cache", None)
        if cached is not None and cached[0] is self.intercepts and cached[1] == self.app_protocol:
            return cached[2]
        out = self.filtered_intercepts()
        self._filters_cache = (self.intercepts, self.app_protocol, out)
        return out

    async def _to_app(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: tuple[Any, ...], first: bytes = b"", copy: bool = False) -> None:
        if not copy:  # both connections as Protocols: no task wake-up per chunk (cluster/relay.py)
            try:
                a2b, b2a = await relay.relay(reader, writer, "127.0.0.1", self.s.app_port, first,
                                             APP_CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("cannot connect to the app on 127.0.0.1:%d: %s", self.s.app_port, exc)
                writer.transport.abort()
                return
            log.debug("%s:%s -> app done (%d up, %d down)", peer[0], peer[1], a2b, b2a)
            return
        try:
            ar, aw = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.s.app_port, limit=STREAM_LIMIT), APP_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot connect to the app on 127.0.0.1:%d: %s", self.s.app_port, exc)
            writer.transport.abort()
            return
        # a wiretap without filters: counts and first bytes of a non-HTTP connection
        a2b, b2a = await self.wiretaps.copy_tcp(reader, writer, ar, aw, first, peer)
        log.debug("%s:%s -> app done (%d up, %d down, copied)", peer[0], peer[1], a2b, b2a)

    async def _open_tunnel(self, ic: pb.InterceptInfo, peer: tuple[Any, ...]) -> Any:
        """A FrameChannel to the intercepting session: over its agent link when one is up (no round
        trip: the connector dials the local app when the `open` arrives), else a GrpcFrameChannel once
        the manager says `opened`; False if refused; None if the manager is unreachable."""
        direct = self.links.channel_for(ic.id, peer)
        if direct is not None:
            return direct
        assert self.stub is not None
        call = self.stub.Tunnel()
        chan = GrpcFrameChannel(call)
        frame = pb.TunnelFrame(open=pb.TunnelOpen(
            session_id=self.agent_id or "",
            protocol=pb.TunnelOpen.TCP,
            kind=pb.TunnelOpen.AGENT_INTERCEPTED,
            intercept_id=ic.id,
            src_ip=_ip_bytes(str(peer[0])),
            src_port=int(peer[1]) if len(peer) > 1 else 0,
            dst_ip=_ip_bytes(self.s.pod_ip),
            dst_port=self.s.app_port,
        ))
        try:
            await chan.send(frame)
            async with asyncio.timeout(OPEN_TIMEOUT):
                reply = await chan.recv()
        except TunnelError as exc:
            cancel_channel(chan)
            if exc.code == "UNAVAILABLE":
                log.warning("manager unreachable for intercept %s; forwarding to the app", ic.id)
                return None
            log.info("intercept %s: tunnel failed: %s", ic.id, exc)
            return False
        except TimeoutError:
            cancel_channel(chan)
            log.info("intercept %s: no answer from the manager within %.0fs", ic.id, OPEN_TIMEOUT)
            return False
        kind = reply.WhichOneof("kind") if reply is not None else None
        if kind == "opened":
            log.debug("intercept %s: tunnel opened for %s:%s", ic.id, peer[0], peer[1])
            return chan
        cancel_channel(chan)
        why = reply.error if kind == "error" else f"unexpected answer {kind!r}"
        log.info("intercept %s: connection from %s:%s refused: %s", ic.id, peer[0], peer[1], why)
        return False

    # ---------------------------------------------------------- manager session
    def agent_info(self) -> pb.AgentInfo:
        s = self.s
        return pb.AgentInfo(
            name=s.name,
            namespace=s.namespace,
            pod_name=s.pod_name,
            pod_ip=s.pod_ip,
            app_container=s.app_container,
            environment=app_environment(s),
            mount_point=s.mount_prefix,  # volumes (and the linked SA token) are served from here
            agent_port=s.agent_port,
            version=__version__,
            link_port=self.links.port,
            link_upgrade=self.links.upgrade,
        )

    def _forget(self) -> None:
        if self.intercepts:
            log.info("forgetting %d intercept(s): traffic goes to the app", len(self.intercepts))
        self.agent_id = None
        self.intercepts = []
        self.links.update([])
        self.wiretaps.clear()

    async def session_loop(self) -> None:
        """Arrive, heartbeat and watch instructions; on any loss, forget and re-arrive."""
        target = f"{self.s.manager_host}:{self.s.manager_port}"
        backoff = 1.0
        failures = 0
        used = False  # whether the current channel carried a session (and maybe tunnels)
        while True:
            lost_reason = ""
            if self.channel is None or used or failures % 4 == 3:
                self._new_channel(target, linger=used)
                used = False
            try:
                info = await asyncio.to_thread(self.agent_info)
                token = await asyncio.to_thread(self._token)
                sess = await self.stub.ArriveAsAgent(info, timeout=20,
                                                     metadata=(("authorization", f"Bearer {token}"),))
                self.agent_id = sess.agent_id
                used = True
                failures = 0
                log.info("arrived at traffic-manager %s as agent %s (%d env vars)",
                         target, sess.agent_id, len(info.environment))
                backoff = 1.0
                await self._run_session(sess)
            except _SessionLost as exc:
                lost_reason = str(exc)
            except grpc.aio.AioRpcError as exc:
                lost_reason = f"{exc.code().name}: {exc.details()}"
            except asyncio.CancelledError:
                self._forget()
                raise
            except Exception as exc:  # keep serving the app whatever happens here
                log.exception("manager session failed")
                lost_reason = repr(exc)
            was = self.agent_id
            failures += 1
            self._forget()
            if was:
                log.warning("lost the traffic-manager session (%s); re-arriving", lost_reason)
                if "NOT_FOUND" in lost_reason:
                    backoff = 0.2  # manager restarted or expired us: come back at once
            else:
                log.info("traffic-manager %s not reachable (%s); retrying in %.0fs",
                         target, lost_reason, backoff)
            await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))
            backoff = min(max(backoff, 1.0) * 2, MAX_BACKOFF)

    def _new_channel(self, target: str, linger: bool) -> None:
        """A fresh channel after a lost session (and every 4th failed arrival): the manager's Service is
        headless, so a restarted manager has a new address that an old
        channel's cached resolution would keep missing.  The previous channel
        is closed later (`linger`) when it carried a session: connections
        being served through it keep going if the manager is in fact still
        there."""
        old = self.channel
        self.channel = grpc.aio.insecure_channel(target, options=[
            *BULK_GRPC_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
            ("grpc.dns_min_time_between_resolutions_ms", 1000),
        ])
        self.stub = rpc.AgentHubStub(self.channel)
        if old is not None and not linger:
            asyncio.ensure_future(old.close())
        elif old is not None:
            loop = asyncio.get_running_loop()
            self._old_channels.add(old)

            def close_old() -> None:
                self._old_channels.discard(old)
                asyncio.ensure_future(old.close())
            loop.call_later(OLD_CHANNEL_LINGER, close_old)

    async def _run_session(self, sess: pb.AgentSession) -> None:
        loops = [asyncio.ensure_future(self._remain_loop(sess)), asyncio.ensure_future(self._watch_loop(sess)),
                 asyncio.ensure_future(self._dials_loop(sess)),
                 asyncio.ensure_future(self.wiretaps.upload_loop(self.stub, sess.agent_id))]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            raise _SessionLost("instruction stream ended")
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _remain_loop(self, sess: pb.AgentSession) -> None:
        assert self.stub is not None
        if self.app_protocol:  # known from before a re-arrival: tell the manager at once
            await self.remain_now()
        while True:
            await asyncio.sleep(REMAIN_INTERVAL)
            try:
                await self.stub.AgentRemain(pb.AgentSession(agent_id=sess.agent_id, app_protocol=self.app_protocol),
                                            timeout=REMAIN_INTERVAL)
            except grpc.aio.AioRpcError as exc:
                raise _SessionLost(f"AgentRemain: {exc.code().name}: {exc.details()}") from None

    async def remain_now(self) -> None:
        if self.stub is None or not self.agent_id:
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.AgentRemain(pb.AgentSession(agent_id=self.agent_id, app_protocol=self.app_protocol),
                                        timeout=REMAIN_INTERVAL)

    def _want_probe(self) -> None:
        """A filtered intercept needs to know whether the app speaks HTTP: probe once, report it."""
        if self.app_protocol or (self._probe is not None and not self._probe.done()):
            return
        if any(httproute.is_filtered(ic.spec) for ic in self.intercepts):
            self._probe = asyncio.ensure_future(self._probe_app())

    async def _probe_app(self) -> None:
        for _ in range(600):  # the app may still be starting: up to ~10 min, then the next instruction retries
            try:
                proto = await httproute.probe("127.0.0.1", self.s.app_port)
                if proto != httproute.HTTP1 and await h2route.probe("127.0.0.1", self.s.app_port) == h2route.H2C:
                    proto = h2route.H2C  # gRPC, or another HTTP/2-only server (the HTTP/1.1 reason is kept else)
                self.app_protocol = proto
                break
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("protocol probe of 127.0.0.1:%d: %s", self.s.app_port, exc)
                await asyncio.sleep(1.0)
        else:
            return
        log.info("the app on port %d speaks %s", self.s.app_port, self.app_protocol)
        await self.remain_now()

    async def _watch_loop(self, sess: pb.AgentSession) -> None:
        assert self.stub is not None
        try:
            async for instr in self.stub.WatchAgentInstructions(sess):
                new = list(instr.intercepts)
                old_ids = {(i.id, i.state) for i in self.intercepts}
                self.intercepts = new
                self.links.update(new)
                self.wiretaps.update(list(instr.wiretaps))
                self._want_probe()
                if {(i.id, i.state) for i in new} != old_ids:
                    desc = ", ".join(f"{i.spec.name or i.id}={pb.InterceptInfo.State.Name(i.state)}"
                                     for i in new) or "none"
                    log.info("instructions: intercepts %s", desc)
        except grpc.aio.AioRpcError as exc:
            raise _SessionLost(f"WatchAgentInstructions: {exc.code().name}: {exc.details()}") from None

    def _token(self) -> str:
        """The projected token, read afresh for each arrival (the kubelet rotates it)."""
        try:
            return Path(self.s.token_file).read_text().strip()
        except OSError as exc:
            log.warning("no agent token at %s (%s): the traffic-manager will refuse us", self.s.token_file,
                        exc.strerror or exc)
            return ""

    async def _dials_loop(self, sess: pb.AgentSession) -> None:
        """The manager asks us to connect its tunnel to our file service (for the intercept's holder)."""
        assert self.stub is not None
        try:
            async for req in self.stub.WatchAgentDials(sess):
                if req.purpose == pb.DialRequest.FILES:
                    task = asyncio.ensure_future(self._answer_files(req))
                    self._conns.add(task)
                    task.add_done_callback(self._conns.discard)
        except grpc.aio.AioRpcError as exc:
            raise _SessionLost(f"WatchAgentDials: {exc.code().name}: {exc.details()}") from None

    def _jail(self) -> Jail:
        from .sftp import SA_DIR

        return Jail(self.s.mount_prefix, also=[SA_DIR] if os.path.isdir(SA_DIR) else [])

    async def _answer_files(self, req: pb.DialRequest) -> None:
        stub = self.stub
        if stub is None or not self.agent_id:
            return
        chan = GrpcFrameChannel(stub.Tunnel())
        try:
            await chan.send(pb.TunnelFrame(open=pb.TunnelOpen(
                session_id=self.agent_id, kind=pb.TunnelOpen.DIAL_ANSWER, dial_id=req.dial_id)))
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.s.sftp_port, limit=STREAM_LIMIT), APP_CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                await chan.send(pb.TunnelFrame(error=f"the agent's file service is down: {exc}"))
                await chan.done_sending()
                return
            await chan.send(pb.TunnelFrame(opened=pb.Empty()))
            # requests pass through the jail: nothing outside the app's volumes is served
            await bridge(reader, FilteringWriter(writer, self._jail()), chan)  # type: ignore[arg-type]
        except (TunnelError, ValueError) as exc:
            log.debug("file tunnel %s ended: %s", req.dial_id[:8], exc)
        finally:
            cancel_channel(chan)

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the listener (the workload's traffic) first, then the health port (readiness)."""
        self.server = await asyncio.start_server(self._handle, "0.0.0.0", self.s.agent_port,
                                                 reuse_address=True, backlog=512, limit=STREAM_LIMIT)
        log.info("listening on 0.0.0.0:%d, app at 127.0.0.1:%d", self.s.agent_port, self.s.app_port)
        if self.s.health_port:
            self.health = await asyncio.start_server(_close_at_once, "0.0.0.0", self.s.health_port,
                                                     reuse_address=True)
        await self.links.start(self.s.link_port, self.s.pod_ip)
        self.ready.set()

    async def run(self) -> None:
        await self.start()
        from .sftp import serve as serve_files  # the app's volumes for the holder (cluster/sftp.py)
        _files = asyncio.ensure_future(serve_files(self.s.sftp_port, self.s.mount_prefix))  # cancelled by asyncio.run's end
        session = asyncio.ensure_future(self.session_loop())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self._stopping.wait()
            log.info("stopping: no new connections, %d open ones get %.0fs", len(self._conns),
                     DRAIN_SECONDS)
        finally:
            await self.stop(session)

    async def stop(self, session: asyncio.Future[Any] | None = None) -> None:
        if self.server is not None:
            self.server.close()
        if self.health is not None:
            self.health.close()
        if session is not None:
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)
        for h2conn in list(self._h2):  # HTTP/2 clients: no new streams here, finish the others
            h2conn.goaway()
        if self._conns:
            _, pending = await asyncio.wait(set(self._conns), timeout=DRAIN_SECONDS)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.links.stop()
        for ch in [self.channel, *self._old_channels]:
            if ch is not None:
                with contextlib.suppress(Exception):
                    await ch.close()


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


def setup_logging(level: str | None = None) -> None:
    lvl = (level or os.environ.get("LOG_LEVEL") or "info").upper()
    if lvl == "WARN":
        lvl = "WARNING"
    logging.basicConfig(
        stream=sys.stdout,
        level=getattr(logging, lvl, logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python3 -m tpnb.cluster agent`."""
    setup_logging()
    settings = AgentSettings.from_env()
    log.info("traffic-agent %s for %s/%s (pod %s, container %s)", __version__, settings.namespace,
             settings.name, settings.pod_name, settings.app_container)
    try:
        asyncio.run(Agent(settings).run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
