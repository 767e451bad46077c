"""The one Python API.  The CLI, the %tp magics and the widget panel are faces of it.

    import tpnb
    s = tpnb.api.Session()
    s.connect()
    s.intercept("hello", port=9000)
    s.env("hello")          # dict of the intercepted pod's environment
    s.leave("hello"); s.quit()

Every method raises a `tpnb.errors.TpnbError` subclass on failure, with the
same words whichever face called it.
"""
from __future__ import annotations

import getpass
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from . import config as tpnb_config
from .client import DaemonClient, Watch
from .errors import ConfigError, InterceptError, NotConnected, TpnbError
from .proto import pb
from .version import __version__

if TYPE_CHECKING:
    from .inkernel import Replayed
    from .remotefs import RemoteFS

ProgressFn = Callable[[pb.Progress], None]


@dataclass
class Intercept:
    name: str
    workload: str
    namespace: str
    kind: str
    service: str
    service_port: str
    local_port: int
    target_host: str
    state: str
    message: str
    holder: str
    pod_ips: list[str]
    environment: dict[str, str]
    mount_point: str
    id: str
    #: personal intercept filters (all empty: every connection); header names as given
    http_headers: dict[str, str] = field(default_factory=dict)
    http_path_prefix: str = ""
    http_path_equal: str = ""
    http_path_regex: str = ""
    #: which path carries its connections, from the connector (agent links or the traffic-manager)
    data_path: str = ""
    #: what the intercepted port speaks, as its traffic-agent probed it: "http/1.1", "h2c" (gRPC), "" unknown
    app_protocol: str = ""
    #: the port the traffic-agent serves in each pod (what the Service now routes to)
    agent_port: int = 0

    @property
    def filtered(self) -> bool:
        return bool(self.http_headers or self.http_path_prefix or self.http_path_equal or self.http_path_regex)

    @classmethod
    def from_pb(cls, ic: pb.InterceptInfo) -> "Intercept":
        return cls(
            name=ic.spec.name, workload=ic.spec.workload, namespace=ic.spec.namespace,
            kind=ic.spec.workload_kind, service=ic.spec.service, service_port=ic.spec.service_port,
            local_port=ic.spec.local_port, target_host=ic.spec.target_host or "127.0.0.1",
            state=pb.InterceptInfo.State.Name(ic.state), message=ic.message, holder=ic.client_name,
            pod_ips=list(ic.pod_ips), environment=dict(ic.environment), mount_point=ic.mount_point, id=ic.id,
            http_headers={h.name: h.value for h in ic.spec.http_headers},
            http_path_prefix=ic.spec.http_path_prefix, http_path_equal=ic.spec.http_path_equal,
            http_path_regex=ic.spec.http_path_regex, data_path=ic.data_path, app_protocol=ic.app_protocol,
            agent_port=ic.agent_port)


@dataclass
class Wiretap:
    """A wiretap of this session: a copy of what the app of `workload` serves (see `Session.wiretap`)."""

    name: str
    workload: str
    namespace: str
    service: str
    service_port: str
    state: str
    message: str
    records: int
    dropped: int
    max_body: int
    buffer: int
    pod_ips: list[str]
    id: str
    http_headers: dict[str, str] = field(default_factory=dict)
    http_path_prefix: str = ""
    http_path_equal: str = ""
    http_path_regex: str = ""

    @classmethod
    def from_pb(cls, w: pb.WiretapInfo) -> "Wiretap":
        sp = w.spec
        return cls(name=sp.name, workload=sp.workload, namespace=sp.namespace, service=sp.service,
                   service_port=sp.service_port, state=pb.InterceptInfo.State.Name(w.state), message=w.message,
                   records=w.records, dropped=w.dropped, max_body=w.max_body, buffer=w.buffer,
                   pod_ips=list(w.pod_ips), id=w.id, http_headers={h.name: h.value for h in sp.http_headers},
                   http_path_prefix=sp.http_path_prefix, http_path_equal=sp.http_path_equal,
                   http_path_regex=sp.http_path_regex)


def _text(b: bytes) -> str:
    return b.decode("latin-1")


#: gRPC status codes by number (grpc.StatusCode's names), for wiretap records of gRPC calls
_GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
               "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
               "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


def _grpc(rec: pb.WiretapRecord) -> dict:
    """gRPC fields of an HTTP/2 record: None for other requests (and for a call without a status yet);
    the status comes from the trailers, or from the headers of a trailers-only answer."""
    grpc_call = any(h.name == b"content-type" and h.value.startswith(b"application/grpc")
                    for h in rec.request_headers)
    if not grpc_call:
        return {"grpc_status": None, "grpc_code": None, "grpc_message": None,
                "request_messages": None, "response_messages": None}
    answer = {bytes(h.name): _text(h.value) for h in (*rec.response_headers, *rec.response_trailers)}
    status = answer.get(b"grpc-status", "")
    code = int(status) if status.isdigit() else None
    name = (_GRPC_CODES[code] if code < len(_GRPC_CODES) else str(code)) if code is not None else None
    return {"grpc_status": code, "grpc_code": name, "grpc_message": answer.get(b"grpc-message") or None,
            "request_messages": rec.request_messages, "response_messages": rec.response_messages}


def wiretap_record(rec: pb.WiretapRecord) -> dict:
    """One copied exchange as a plain dict, in the shape of `tpnb.requests_log`'s records
    (time, type, method, path, query, status, duration_ms, bytes, client, error, headers, bodies;
    for gRPC calls over HTTP/2 also grpc_status, grpc_code, grpc_message and message counts)."""
    import datetime as _dt

    path, _, query = _text(rec.target).partition("?")
    tcp = rec.kind == pb.WiretapRecord.TCP
    return {
        "time": _dt.datetime.fromtimestamp(rec.start_unix).isoformat(timespec="milliseconds"),
        "type": "tcp" if tcp else "http", "method": "" if tcp else rec.method, "path": path, "query": query,
        "status": rec.status, "duration_ms": round(rec.latency_ms, 3),
        "bytes": rec.bytes_down if tcp else rec.response_bytes, "client": rec.client, "pod": rec.pod_name,
        "error": rec.error or None, "http_version": rec.http_version,
        "request_headers": [(_text(h.name), _text(h.value)) for h in rec.request_headers],
        "request_body": bytes(rec.request_body), "request_bytes": rec.request_bytes,
        "response_headers": [(_text(h.name), _text(h.value)) for h in rec.response_headers],
        "response_trailers": [(_text(h.name), _text(h.value)) for h in rec.response_trailers],
        "response_body": bytes(rec.response_body), "response_bytes": rec.response_bytes, **_grpc(rec),
        "reason": _text(rec.reason), "bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down,
        "first_up": bytes(rec.first_up), "first_down": bytes(rec.first_down), "dropped": rec.dropped, "seq": rec.seq,
    }


class WiretapStream(Watch[dict]):
    """A running wiretap: iterate it for record dicts (`wiretap_record`), `cancel()` (any thread) ends it.

    `stats` holds the latest Wiretap (records and drops so far).  Iterate on one thread only.
    """

    def __init__(self, call: object, started: pb.WiretapInfo, events: "Iterator[pb.WiretapEvent]") -> None:
        super().__init__(call, self._record, events)
        self.stats = Wiretap.from_pb(started)
        self.name = self.stats.name

    def _record(self, ev: pb.WiretapEvent) -> "dict | None":
        kind = ev.WhichOneof("kind")
        if kind == "record":
            self.stats.records += 1
            self.stats.dropped = max(self.stats.dropped, ev.record.dropped)
            return wiretap_record(ev.record)
        if kind == "stats":
            self.stats = Wiretap.from_pb(ev.stats)
        return None


@dataclass
class DataPlane:
    """How outbound TCP reaches pods (issue 15): "direct" port-forwards from the connector, or
    the "manager" tunnels; `reason` says why; counters since the session started."""

    plane: str = ""
    reason: str = ""
    #: connector.data_plane: auto, direct or manager
    mode: str = ""
    namespaces_denied: list[str] = field(default_factory=list)
    sessions: int = 0
    dials: int = 0
    fallbacks: int = 0
    dial_errors: int = 0
    #: the root daemon's hand-off of redirected connections to the connector
    handoff_linked: bool = False
    handoff_note: str = ""
    handoff_taken: int = 0
    handoff_not_mine: int = 0
    handoff_refused: int = 0
    handoff_lost: int = 0

    @classmethod
    def from_pb(cls, d: pb.DataPlaneStatus) -> "DataPlane":
        h = d.handoff
        return cls(plane=d.plane, reason=d.reason, mode=d.mode, namespaces_denied=list(d.namespaces_denied),
                   sessions=d.sessions, dials=d.dials, fallbacks=d.fallbacks, dial_errors=d.dial_errors,
                   handoff_linked=h.linked, handoff_note=h.note, handoff_taken=h.taken,
                   handoff_not_mine=h.not_mine, handoff_refused=h.refused, handoff_lost=h.lost)


@dataclass
class Status:
    connected: bool
    context: str = ""
    server: str = ""
    namespace: str = ""
    mapped_namespaces: list[str] = field(default_factory=list)
    pod_subnets: list[str] = field(default_factory=list)
    service_subnets: list[str] = field(default_factory=list)
    also_proxy: list[str] = field(default_factory=list)
    dns_ip: str = ""
    tun_name: str = ""
    manager_version: str = ""
    manager_namespace: str = ""
    session_id: str = ""
    daemon_version: str = ""
    daemon_running: bool = True
    intercepts: list[Intercept] = field(default_factory=list)
    error: str = ""
    #: how TCP to the cluster is carried: "kernel" (nftables redirect) or "tun"
    tcp_engine: str = ""
    tcp_engine_note: str = ""
    #: system-wide outbound (the root daemon's TUN, routes, DNS) is up; when not, why
    outbound: bool = False
    outbound_note: str = ""
    root_daemon_version: str = ""
    #: "system-wide" (the root daemon), "rootless" (the connector's proxy and in-kernel sockets), or ""
    outbound_mode: str = ""
    #: rootless: the connector's SOCKS5 and HTTP proxy (with the session's token)
    proxy_socks_url: str = ""
    proxy_http_url: str = ""
    #: rootless: the variables a process needs to use them (tpnb.rootless.proxy_env)
    proxy_env: dict[str, str] = field(default_factory=dict)
    #: rootless: what reaches the cluster, and what does not
    outbound_covers: list[str] = field(default_factory=list)
    outbound_not_covered: str = ""
    #: in-cluster mode: this client runs in a pod of the cluster (why; whose rights; the pod's IP)
    in_cluster: bool = False
    in_cluster_note: str = ""
    credentials: str = ""
    pod_ip: str = ""
    #: this session's wiretaps (records and drops so far)
    wiretaps: list[Wiretap] = field(default_factory=list)
    #: how outbound TCP reaches pods: direct port-forwards or the manager (issue 15)
    data_plane: DataPlane = field(default_factory=DataPlane)

    @classmethod
    def from_pb(cls, st: pb.ConnectionStatus, daemon_running: bool = True) -> "Status":
        out = cls(
            connected=st.connected, context=st.context, server=st.server, namespace=st.namespace,
            mapped_namespaces=list(st.mapped_namespaces), pod_subnets=list(st.pod_subnets),
            service_subnets=list(st.service_subnets), also_proxy=list(st.also_proxy), dns_ip=st.dns_ip,
            tun_name=st.tun_name, manager_version=st.manager_version, manager_namespace=st.manager_namespace,
            session_id=st.session_id, daemon_version=st.daemon_version, daemon_running=daemon_running,
            intercepts=[Intercept.from_pb(i) for i in st.intercepts], error=st.error,
            tcp_engine=st.tcp_engine, tcp_engine_note=st.tcp_engine_note, outbound=st.outbound,
            outbound_note=st.outbound_note, root_daemon_version=st.root_daemon_version)
        out.proxy_socks_url, out.proxy_http_url = st.proxy_socks_url, st.proxy_http_url
        out.wiretaps = [Wiretap.from_pb(w) for w in st.wiretaps]
        out.data_plane = DataPlane.from_pb(st.data_plane)
        out.in_cluster, out.in_cluster_note = st.in_cluster, st.in_cluster_note
        out.credentials, out.pod_ip = st.credentials, st.pod_ip
        if st.in_cluster and st.connected:
            out.outbound_mode = "in-cluster"
            out.outbound_covers = list(IN_CLUSTER_COVERS)
            out.outbound_not_covered = IN_CLUSTER_NOT_COVERED
        elif st.outbound:
            out.outbound_mode = "system-wide"
            out.outbound_covers = ["every process of this machine (TUN, routes, DNS)"]
        elif st.proxy_socks_url and st.connected:
            from . import rootless

            out.outbound_mode = "rootless"
            out.proxy_env = rootless.proxy_env(out)
            out.outbound_covers = list(rootless.COVERS)
            out.outbound_not_covered = rootless.NOT_COVERED
        return out


#: in-cluster mode: what this pod's processes reach, and what tpnb then leaves out
IN_CLUSTER_COVERS = ("every process of this pod, through the pod's own network and cluster DNS (no tunnel, "
                     "no root daemon, no proxy)",
                     "intercepts, env and volumes (FUSE-less reader) with this pod's ServiceAccount's rights; "
                     "intercepted connections reach this pod's loopback through the session's tunnel")
IN_CLUSTER_NOT_COVERED = ("names of other clusters and --also-proxy subnets (the pod's network decides), "
                          "sshfs mounts where the pod has no /dev/fuse")


@dataclass
class Workload:
    name: str
    namespace: str
    kind: str
    services: list[str]
    #: "free", "agent_installed", "intercepted_by_me" or "intercepted_by_other" (see `holder`)
    state: str
    agent_installed: bool
    intercept: Intercept | None
    holder: str = ""
    #: this session's wiretaps of the workload (records and drops so far)
    wiretaps: list[Wiretap] = field(default_factory=list)

    @property
    def state_text(self) -> str:
        """The state as `tpnb list` words it."""
        return {"free": "free", "agent_installed": "agent installed", "intercepted_by_me": "intercepted by me",
                "intercepted_by_other": f"intercepted by {self.holder}"}.get(self.state, self.state)


def _user() -> str:
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _check_cidrs(cidrs: list[str]) -> list[str]:
    out = []
    for c in cidrs:
        try:
            out.append(str(ipaddress.ip_network(c, strict=False)))
        except ValueError:
            raise ConfigError(f"invalid --also-proxy value {c!r}", "it is not a CIDR",
                              "use a subnet such as 10.1.0.0/16 or a single address 10.1.2.3/32") from None
    return out


class Session:
    """A handle on this machine's tpnb connector (and through it the root daemon) and its one session."""

    def __init__(self, cfg: tpnb_config.Config | None = None) -> None:
        self.cfg = cfg or tpnb_config.get()
        self.client = DaemonClient(self.cfg)

    # ---------------------------------------------------------------- session
    def connect(self, namespace: str | None = None, mapped_namespaces: list[str] | tuple[str, ...] = (),
                also_proxy: list[str] | tuple[str, ...] = (), kubeconfig: str | None = None,
                context: str | None = None, progress: ProgressFn | None = None,
                say: Callable[[str], None] | None = None, no_root: bool = False,
                in_cluster: bool | None = None) -> Status:
        """Connect; `no_root`: never start the root daemon (rootless outbound: tpnb.rootless);
        `in_cluster`: this runs in a pod of the cluster (default: connector.in_cluster, which
        detects it from the pod's environment; tpnb.common.incluster)."""
        from .common import incluster

        mode = incluster.decide(self.cfg.connector.in_cluster, in_cluster)
        req = pb.ConnectRequest(
            kubeconfig=kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG", ""),
            context=context or "", namespace=namespace or "",
            mapped_namespaces=[m for m in mapped_namespaces if m], also_proxy=_check_cidrs(list(also_proxy)),
            user=_user(), home=os.environ.get("HOME", ""), install_manager=True)
        if not req.kubeconfig:
            default = os.path.expanduser("~/.kube/config")
            if os.path.exists(default):  # in a pod too: a mounted kubeconfig wins over the ServiceAccount
                req.kubeconfig = default
        if mode.in_cluster:  # no root daemon, no proxy: the pod's network is already the cluster's
            self.client.ensure_processes(say, no_root=True)
            req.in_cluster, req.in_cluster_note = True, mode.why
            req.daemon_socket, req.outbound_note = "", f"in-cluster mode, {mode.why}"
        else:
            req.daemon_socket, req.outbound_note = self.client.ensure_processes(say, no_root=no_root)
        done = self.client.stream(self.client.stub().Connect, req, progress)
        st = Status.from_pb(done)  # type: ignore[arg-type]
        self._clean_mounts(st.intercepts)
        return st

    def status(self) -> Status:
        if not self.client.running():
            return Status(connected=False, daemon_running=False)
        return Status.from_pb(self.client.call(self.client.stub().Status, pb.Empty()))

    def watch_status(self) -> "Watch[Status]":
        """Every change of the connection and its intercepts, as it happens (and every 15 s regardless).

        Iterate it on a thread of your own; `cancel()` ends it.
        """
        self._require_daemon()
        return self.client.watch(self.client.stub().WatchStatus, pb.Empty(), Status.from_pb)  # type: ignore[arg-type]

    def quit(self, stop_daemon: bool = False) -> bool:
        """End the session (and stop the daemon too with stop_daemon). False if nothing ran."""
        self._clean_mounts([])  # no intercept outlives the session: nor do its volume mounts
        if not self.client.running():
            if stop_daemon:  # a root daemon whose connector was killed
                self.client.stop_root_daemon()
            return False
        self.client.call(self.client.stub().Quit, pb.QuitRequest(stop_daemon=stop_daemon), timeout=60)
        if stop_daemon:
            self.client.close()
        return True

    def version(self) -> dict[str, str]:
        out = {"client": __version__}
        if self.client.running():
            for v in self.client.call(self.client.stub().Version, pb.Empty()).versions:
                out[v.name] = v.version
        return out

    def set_log_level(self, level: str) -> None:
        self._require_daemon()
        self.client.call(self.client.stub().SetLogLevel, pb.LogLevelRequest(level=level))

    def _require_daemon(self) -> None:
        if not self.client.running():
            raise NotConnected("not connected", "the tpnb daemon is not running",
                               "run `tpnb connect` (or `%tp connect`) first")

    # ---------------------------------------------------------------- workloads & intercepts
    def list(self, namespace: str | None = None) -> list[Workload]:
        self._require_daemon()
        lst = self.client.call(self.client.stub().List, pb.ListRequest(namespace=namespace or ""), timeout=60)
        return [Workload(name=w.name, namespace=w.namespace, kind=w.kind, services=list(w.services),
                         state=pb.WorkloadState.Name(w.state).lower(), holder=w.holder,
                         agent_installed=w.agent_installed,
                         intercept=Intercept.from_pb(w.intercept) if w.HasField("intercept") else None,
                         wiretaps=[Wiretap.from_pb(t) for t in w.wiretaps])
                for w in lst.workloads]

    def intercept(self, name: str, port: int, namespace: str | None = None, service: str | None = None,
                  service_port: str | None = None, workload: str | None = None,
                  progress: ProgressFn | None = None, skip_port_check: bool = False,
                  owner_pid: int | None = None, http_headers: Sequence[tuple[str, str]] = (),
                  http_path_prefix: str = "", http_path_equal: str = "", http_path_regex: str = "",
                  container: str = "") -> Intercept:
        """Route workload `name`'s traffic to 127.0.0.1:`port`.

        With HTTP filters (a personal intercept) only matching requests come
        here, the rest go on to the app: `http_headers` are (name, value) pairs
        that must all be present (("", "") asks for a header unique to this
        session, `--http-header=auto`); at most one of the path filters.

        `container` names the app container of a pod with several (`--container`).

        With `owner_pid` (e.g. `os.getpid()` of a kernel) the daemon ends the
        intercept by itself once that process is gone, however it died.
        """
        self._require_daemon()
        self._clean_mounts(None if not self.client.running() else self.intercepts())
        spec = pb.InterceptSpec(name=name, workload=workload or name, namespace=namespace or "",
                                service=service or "", service_port=str(service_port or ""),
                                local_port=int(port), target_host="127.0.0.1",
                                http_headers=[pb.HeaderMatch(name=k, value=v) for k, v in http_headers],
                                http_path_prefix=http_path_prefix or "", http_path_equal=http_path_equal or "",
                                http_path_regex=http_path_regex or "", container=container or "")
        done = self.client.stream(self.client.stub().Intercept,
                                  pb.InterceptRequest(spec=spec, skip_port_check=skip_port_check,
                                                      owner_pid=owner_pid or 0), progress)
        return Intercept.from_pb(done)  # type: ignore[arg-type]

    def leave(self, name: str) -> None:
        self._require_daemon()
        self.client.call(self.client.stub().Leave, pb.LeaveRequest(name=name))
        self.unmount(name)
        self._clean_mounts(self.intercepts())

    def wiretap(self, name: str, service_port: str | None = None, namespace: str | None = None,
                service: str | None = None, workload: str | None = None, progress: ProgressFn | None = None,
                http_headers: Sequence[tuple[str, str]] = (), http_path_prefix: str = "",
                http_path_equal: str = "", http_path_regex: str = "", max_body: int | None = None,
                buffer: int | None = None) -> WiretapStream:
        """Copy what workload `name`'s app serves to this machine, while it keeps serving every request.

        Returns once the wiretap is ACTIVE; iterate the result for the records (dicts).  The
        wiretap ends (and is removed from the cluster) when the stream is cancelled or this
        process dies.  HTTP filters copy only matching requests.  `max_body` and `buffer`
        default to `wiretap.max_body` and `wiretap.buffer` of the configuration.
        """
        self._require_daemon()
        spec = pb.InterceptSpec(name=name, workload=workload or name, namespace=namespace or "",
                                service=service or "", service_port=str(service_port or ""),
                                http_headers=[pb.HeaderMatch(name=k, value=v) for k, v in http_headers],
                                http_path_prefix=http_path_prefix or "", http_path_equal=http_path_equal or "",
                                http_path_regex=http_path_regex or "")
        wcfg = self.cfg.wiretap
        mb = wcfg.max_body if max_body is None else int(max_body)
        buf = wcfg.buffer if buffer is None else int(buffer)
        if mb < 0 or buf < 1:
            raise ConfigError(f"invalid wiretap limits (max_body {mb}, buffer {buf})",
                              "max_body must be 0 or more bytes and buffer at least 1 record",
                              "fix wiretap.max_body / wiretap.buffer (`tpnb config view` shows where they are set)")
        req = pb.WiretapRequest(wiretap=pb.WiretapInfo(spec=spec, max_body=mb, buffer=buf))
        call = self.client.stub().Wiretap(req)
        events = iter(call)
        import grpc

        from .client import _wire_error

        try:
            for ev in events:
                kind = ev.WhichOneof("kind")
                if kind == "progress":
                    if progress:
                        progress(ev.progress)
                elif kind == "started":
                    return WiretapStream(call, ev.started, events)
        except grpc.RpcError as exc:
            raise _wire_error(exc) from None
        except BaseException:
            call.cancel()
            raise
        raise InterceptError(f"the wiretap of {name} ended before it started",
                             hint="see ~/.cache/tpnb/logs/connector.log")

    def wiretaps(self) -> list[Wiretap]:
        return self.status().wiretaps

    def intercepts(self) -> list[Intercept]:
        return self.status().intercepts

    def get_intercept(self, name: str) -> Intercept:
        for ic in self.intercepts():
            if ic.name == name:
                return ic
        raise NotConnected(f"no intercept named {name!r}", hint="`tpnb list` shows what is intercepted")

    def env(self, name: str) -> dict[str, str]:
        """The intercepted pod's app container environment."""
        return dict(self.get_intercept(name).environment)

    # ---------------------------------------------------------------- volumes (tpnb/mounts.py, remotefs.py)
    def mount(self, name: str, root: str | os.PathLike[str] | None = None,
              intercept: Intercept | None = None) -> Path:
        """Mount intercept `name`'s pod volumes with sshfs on `root` (default: a fresh temp dir).

        `<root>/etc/config/x` is the app's `/etc/config/x`.  The mount stays
        until `unmount(name)`, `leave(name)` or `quit()`.
        """
        from . import mounts

        ic = intercept or self.get_intercept(name)
        return mounts.mount(ic, root, self.cfg, via=self._file_service(ic))

    def _file_service(self, ic: Intercept) -> tuple[str, int]:
        """Where the agent's file service is reached: a loopback port of the connector that the
        manager joins to the agent of this intercept (only the session holding it may)."""
        if not ic.pod_ips:
            raise InterceptError(f"cannot reach the files of {ic.name}", "the intercept has no pod address yet",
                                 "retry once it is ACTIVE")
        reply = self.client.call(self.client.stub().ForwardToCluster,
                                 pb.ForwardRequest(ip=ic.pod_ips[0], port=self.cfg.agent.sftp_port,
                                                   intercept_id=ic.id))
        return "127.0.0.1", reply.local_port

    def unmount(self, name: str) -> None:
        """Unmount intercept `name`'s volumes if this process's mount namespace has them mounted."""
        from . import mounts

        mounts.unmount_name(name)

    def mounts(self) -> dict[str, Path]:
        """Intercept name -> local mount point of its volumes."""
        from . import mounts

        return mounts.mounts()

    def files(self, name: str) -> "RemoteFS":
        """The intercepted app's volumes without FUSE: `s.files("hello").read_text("/etc/config/app.yaml")`."""
        from .remotefs import RemoteFS

        ic = self.get_intercept(name)
        host, port = self._file_service(ic)
        try:
            return RemoteFS(host, port, self.cfg.agent.mount_prefix)
        except OSError as exc:
            raise InterceptError(f"cannot reach the file service of {name} (pod {ic.pod_ips[0]})",
                                 exc.strerror or str(exc),
                                 f"check `kubectl -n {ic.namespace} logs deploy/{ic.workload} -c traffic-agent`"
                                 ) from None

    def _clean_mounts(self, active: list[Intercept] | None) -> None:
        """Unmount what a crashed client left behind; never fails the caller's real work."""
        from . import mounts

        try:
            mounts.cleanup_stale(None if active is None else {i.name: list(i.pod_ips) for i in active})
        except (OSError, TpnbError):
            pass

    def uninstall(self, agent: str | None = None, all_agents: bool = False, everything: bool = False,
                  namespace: str | None = None, progress: ProgressFn | None = None) -> str:
        chosen = [bool(agent), all_agents, everything].count(True)
        if chosen != 1:
            raise ConfigError("choose exactly one of --agent NAME, --all-agents, --everything",
                              hint="e.g. `tpnb uninstall --everything`")
        what = (pb.UninstallRequest.AGENT if agent else
                pb.UninstallRequest.ALL_AGENTS if all_agents else pb.UninstallRequest.EVERYTHING)
        conn = pb.ConnectRequest(kubeconfig=os.environ.get("KUBECONFIG", ""), user=_user())
        self.client.ensure_connector()
        req = pb.UninstallRequest(what=what, name=agent or "", namespace=namespace or "", connection=conn)
        return str(self.client.stream(self.client.stub().Uninstall, req, progress))

    # ---------------------------------------------------------------- replay (tpnb.replay, the panel's Replay buttons)
    def app_address(self, name: str) -> tuple[str, int, str]:
        """(host, port, what) of a loopback port that reaches intercept `name`'s real app in the cluster.

        The path: the connector's loopback forward (`ForwardToCluster`, one tunnel per connection through
        the manager, which dials from its pod) to the intercepted pod's IP on the app container's own
        port, the port the traffic-agent hands non-intercepted traffic to.  The Service points at the
        agent; the app's port does not, so a request sent there never meets the intercept, and this needs
        neither the root daemon nor a new manager rule (`connect` reaches pod IPs anyway).  Only this
        session's intercepts qualify: the connector shows other sessions' without pod address or id.
        The app's port is the Service's targetPort as `list` shows it (the object as before injection).
        """
        ic = self.get_intercept(name)
        if not ic.id or not ic.pod_ips:
            raise InterceptError(f"cannot replay to the cluster's {name}",
                                 "the intercept has no pod address yet (or is not this session's)",
                                 "retry once `tpnb list` shows it ACTIVE and intercepted by you")
        wl = next((w for w in self.list(ic.namespace) if w.name == ic.workload), None)
        port = app_port(wl.services if wl else [], ic.service, ic.service_port, name)
        reply = self.client.call(self.client.stub().ForwardToCluster, pb.ForwardRequest(ip=ic.pod_ips[0], port=port))
        return "127.0.0.1", reply.local_port, f"http://{ic.pod_ips[0]}:{port} (the app of {ic.namespace}/{ic.workload})"

    def replay(self, record: object, to: str = "cluster", timeout: float = 30.0) -> "Replayed":
        """Send a recorded in-kernel request again; `to`: "cluster" (the real app of the record's intercept,
        bypassing it: `app_address`), "kernel" (the in-kernel app) or a base URL.  Returns the response."""
        from . import inkernel

        if to != "cluster":
            return inkernel.replay(record, to=to, timeout=timeout)
        rec = inkernel.as_record(record)
        name = rec.get("intercept") or ""
        if not name:
            raise ConfigError("this request has no intercept to replay to",
                              f"port {rec.get('port')} was not routed from the cluster when it was served",
                              'replay it with to="kernel", or to a URL such as "http://hello.default"')
        host, port, what = self.app_address(name)
        return inkernel.send_recorded(rec, host, port, timeout=timeout, shown_as=what.split(" ")[0])


def app_port(services: Sequence[str], service: str, service_port: str, name: str = "") -> int:
    """The app container's port behind `service`[:`service_port`], from `list`'s "svc:[name/]port->target"."""
    targets = []
    for entry in services:
        svc, _, rest = entry.partition(":")
        spec, _, target = rest.partition("->")
        pname, _, pnum = spec.rpartition("/")
        if svc == service and (not service_port or service_port in (pname, pnum)):
            targets.append(target)
    if len(targets) != 1:
        raise InterceptError(f"cannot tell which port the app of {name or service} listens on",
                             f"service {service!r} port {service_port or '(any)'} matches {len(targets)} of "
                             f"{list(services)}",
                             'replay to the app\'s URL yourself: tpnb.replay(rec, to="http://POD_IP:PORT")')
    if not targets[0].isdigit():
        raise InterceptError(f"cannot tell which port the app of {name or service} listens on",
                             f"the Service names its target port ({targets[0]!r}), not a number",
                             'replay to the app\'s URL yourself: tpnb.replay(rec, to="http://POD_IP:PORT")')
    return int(targets[0])
