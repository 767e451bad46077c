"""Text shapes shared by the CLI and the magics, so both print the same thing;
and `as_json`, the one JSON rendering of every result (`-o json`)."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
from os import PathLike
from typing import Any

from .api import Intercept, Status, Workload


def to_data(obj: Any) -> Any:
    """An api result as plain JSON-able data: dataclasses (Status, Workload, Intercept,
    nested or in lists and dicts) through `dataclasses.asdict`, so every field is
    included, new ones too; paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, PathLike):
        return os.fspath(obj)
    return obj


def as_json(obj: Any) -> str:
    """The JSON document `-o json` prints for `obj` (one document, no trailing newline)."""
    return json.dumps(to_data(obj), indent=2, default=str)


def wiretap_what(w: Any) -> str:
    """What a wiretap copies, e.g. "default/hello (every request the app serves)"."""
    parts = [f"header {k}: {v}" for k, v in w.http_headers.items()]
    if w.http_path_prefix:
        parts.append(f"path prefix {w.http_path_prefix}")
    if w.http_path_equal:
        parts.append(f"path {w.http_path_equal}")
    if w.http_path_regex:
        parts.append(f"path matching {w.http_path_regex}")
    what = "HTTP requests with " + " and ".join(parts) if parts else "every request the app serves"
    return f"{w.namespace}/{w.workload} ({what}, bodies up to {w.max_body} B)"


def intercepting(ic: Intercept) -> str:
    """'all connections', or which HTTP requests a personal intercept takes."""
    parts = [f"header {k}: {v}" for k, v in ic.http_headers.items()]
    if ic.http_path_prefix:
        parts.append(f"path prefix {ic.http_path_prefix}")
    if ic.http_path_equal:
        parts.append(f"path {ic.http_path_equal}")
    if ic.http_path_regex:
        parts.append(f"path matching {ic.http_path_regex}")
    return "HTTP requests with " + " and ".join(parts) + " (others: the app)" if parts else "all connections"


#: AgentInfo/InterceptInfo.app_protocol of a port that speaks HTTP/2 with prior knowledge (cluster/h2route.H2C)
H2C = "h2c"


def try_command(ic: Intercept) -> str:
    """A ready command whose request this personal intercept takes ("" without header filters): the
    auto header's value is only shown here.  `curl -H` for HTTP/1.1; for a port that speaks h2c
    (gRPC, as the agent's probe reports) `grpcurl -plaintext -H`, listing the services (`list`,
    through server reflection) or, with --http-path-equal /pkg.Service/Method, calling that method."""
    if not ic.http_headers:
        return ""
    hs = " ".join(f"-H {shlex.quote(f'{k}: {v}')}" for k, v in ic.http_headers.items())
    port = ic.service_port if ic.service_port and ic.service_port.isdigit() else ""
    host = f"{ic.service or ic.workload}.{ic.namespace}"
    if ic.app_protocol == H2C:
        if port:
            addr = f"{host}:{port}"
        elif ic.pod_ips and ic.agent_port:   # the Service's port is not known here: the pod's agent
            addr = f"{ic.pod_ips[0]}:{ic.agent_port}"
        else:
            addr = f"{host}:PORT"
        what = ic.http_path_equal.lstrip("/") if ic.http_path_equal.count("/") == 2 else "list"
        return f"grpcurl -plaintext {hs} {addr} {shlex.quote(what)}"
    path = ic.http_path_equal or ic.http_path_prefix or "/"
    return f"curl {hs} http://{host}{':' + port if port else ''}{path}"


def intercept_block(ic: Intercept, mount_root: str | PathLike[str] | None = None) -> str:
    kind = (ic.kind or "workload").lower()
    state = ic.state
    lines = [
        f"Using {kind} {ic.workload}",
        "intercepted",
        f"    Intercept name: {ic.name}",
        f"    State         : {state}" + (f" ({ic.message})" if ic.message else ""),
        f"    Workload kind : {ic.kind}",
        f"    Destination   : {ic.target_host}:{ic.local_port}",
        f"    Service       : {ic.service}" + (f" port {ic.service_port}" if ic.service_port else ""),
        f"    Intercepting  : {intercepting(ic)}",
    ]
    try_ = try_command(ic)
    if try_:
        lines.append(f"    Try           : {try_}")
    if mount_root is not None:  # where the pod's volumes are mounted (tpnb/mounts.py)
        lines.insert(6, f"    Volume Mount Point: {mount_root}")
    return "\n".join(lines)


def status_text(st: Status) -> str:
    if not st.daemon_running:
        return "tpnb daemon: not running\nNot connected"
    if not st.connected:
        return f"tpnb daemon: running (v{st.daemon_version})\nNot connected"
    lines = [
        f"tpnb daemon: running (v{st.daemon_version})",
        f"Connected to context {st.context} ({st.server})",
        f"  Session          : {st.session_id}",
        f"  Namespace        : {st.namespace}",
        f"  Mapped namespaces: {', '.join(st.mapped_namespaces)}",
        f"  Pod subnets      : {', '.join(st.pod_subnets) or '-'}",
        f"  Service subnets  : {', '.join(st.service_subnets) or '-'}",
        f"  Also proxy       : {', '.join(st.also_proxy) or '-'}",
        *(outbound_lines(st)),
        *(data_plane_lines(st)),
        f"  Traffic manager  : {st.manager_version} in namespace {st.manager_namespace}",
    ]
    if st.error:
        lines.append(f"  Problem          : {st.error}")
    if st.intercepts:
        lines.append("  Intercepts       :")
        for ic in st.intercepts:
            lines.append(f"    {ic.name}: {ic.namespace}/{ic.workload} -> {ic.target_host}:{ic.local_port} ({ic.state})")
            if ic.data_path:
                lines.append(f"      data path: {ic.data_path}")
    if st.wiretaps:
        lines.append("  Wiretaps         :")
        for w in st.wiretaps:
            lines.append(f"    {w.name}: {w.namespace}/{w.workload} ({w.state}, {w.records} records, {w.dropped} dropped)")
    return "\n".join(lines)


def connected_text(st: Status) -> str:
    """What every face says once connected; a second line when there is no system-wide outbound."""
    line = f"Connected to context {st.context} ({st.server})"
    if st.outbound:
        return line
    return line + "\n" + outbound_notice(st)


def outbound_notice(st: Status) -> str:
    why = st.outbound_note or "no root daemon"
    why = why[0].upper() + why[1:]
    if st.outbound_mode == "in-cluster":
        return (f"In-cluster mode ({st.in_cluster_note}): this pod reaches the cluster as it is (cluster DNS, "
                f"no tunnel, no root daemon); intercepts, env and volumes use {st.credentials or 'its credentials'}.")
    if st.outbound_mode == "rootless":
        return (f"{why}. Meanwhile intercepts, env and volumes work, and outbound is rootless: Python code in a "
                "%tp kernel reaches the cluster as it is, other processes through the connector's proxy "
                "(`tpnb connect --no-root -- CMD`, or eval \"$(tpnb connect --no-root)\").")
    return (f"{why}. Meanwhile intercepts, env and volumes work; cluster names resolve only through them "
            "(or in a process of your own with cluster DNS).")


def outbound_lines(st: Status) -> list[str]:
    """System-wide outbound: the root daemon's DNS and TCP engine, or why there is none."""
    if st.outbound_mode == "in-cluster":
        return [f"  Mode             : in-cluster ({st.in_cluster_note})",
                f"  Pod IP           : {st.pod_ip or '-'}",
                f"  Credentials      : {st.credentials or '-'}",
                *(f"  Covers           : {c}" for c in st.outbound_covers),
                f"  Not covered      : {st.outbound_not_covered}"]
    if not st.outbound:
        lines = [f"  Outbound         : not system-wide ({st.outbound_note or 'no root daemon'}); "
                 "intercepts, env and volumes work"]
        if st.outbound_mode == "rootless":
            port = st.proxy_http_url.rsplit(":", 1)[-1]
            lines += [f"  Rootless outbound: SOCKS5 + HTTP proxy on 127.0.0.1:{port}, for processes given the proxy "
                      "variables (`tpnb connect --no-root -- CMD`, or eval \"$(tpnb connect --no-root)\")",
                      "                     and Python code in kernels connected with %tp (requests, httpx, urllib, "
                      "asyncio, socket)",
                      f"  Not covered      : {st.outbound_not_covered}"]
        return lines
    return [
        f"  DNS              : {st.dns_ip} (via {st.tun_name})",
        "  TCP engine       : " + ("kernel (nftables redirect)" if st.tcp_engine == "kernel"
                                    else f"TUN ({st.tcp_engine_note})" if st.tcp_engine_note else "TUN"),
    ]


def data_plane_lines(st: Status) -> list[str]:
    """Which path outbound TCP takes to pods, why, and what went which way."""
    d = st.data_plane
    if not d.plane or st.in_cluster:
        return []
    if d.plane != "direct":
        return [f"  Data plane       : manager tunnels ({d.reason or 'connector.data_plane is ' + d.mode})"]
    line = (f"  Data plane       : direct port-forward ({d.sessions} session{'s' * (d.sessions != 1)}, "
            f"{d.dials} dial{'s' * (d.dials != 1)}, {d.fallbacks} via manager"
            + (f", {d.dial_errors} refused/failed" if d.dial_errors else "") + f"; {d.reason})")
    lines = [line]
    if d.namespaces_denied:
        lines.append(f"                     via manager: pods/portforward denied in {', '.join(d.namespaces_denied)}")
    if st.outbound:
        if d.handoff_linked:
            lines.append(f"  Hand-off         : the root daemon hands redirected TCP to the connector "
                         f"({d.handoff_taken} direct, {d.handoff_not_mine} to the manager"
                         + (f", {d.handoff_refused} refused" if d.handoff_refused else "")
                         + (f", {d.handoff_lost} lost" if d.handoff_lost else "") + ")")
        else:
            lines.append(f"  Hand-off         : not linked ({d.handoff_note or 'the root daemon has no link'}); "
                         "system-wide TCP goes through the manager")
    return lines


def workloads_text(ws: list[Workload]) -> str:
    if not ws:
        return "No interceptable workloads (deployments, replicasets, statefulsets) found"
    width = max(len(w.name) for w in ws)
    out = []
    for w in ws:
        svcs = ", ".join(w.services) or "no service"
        taps = "".join(f", wiretapped by me ({t.records} records, {t.dropped} dropped)" for t in w.wiretaps)
        out.append(f"{w.name:<{width}} : {w.state_text}{taps} ({w.kind}; {svcs})")
    return "\n".join(out)


def versions_text(v: dict[str, str]) -> str:
    names = {"client": "Client", "daemon": "Daemon", "traffic-manager": "Traffic Manager"}
    return "\n".join(f"{names.get(k, k)}: v{val}" if k != "traffic-manager" else f"{names[k]}: {val}"
                     for k, val in v.items())
