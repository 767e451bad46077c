"""Intercept, leave, list and uninstall: the daemon's side of issue 4.

The daemon acts with the user's kubeconfig (so RBAC is the user's), injects
the traffic-agent, then claims the workload at the manager.  The manager only
brokers; it has no write access to user objects.
"""
from __future__ import annotations

import asyncio
import getpass
import hashlib
import logging
from typing import Callable

import anyio
import grpc

from tpnb import config as tpnb_config
from tpnb.errors import InterceptError
from tpnb.common import httpfilter
from tpnb.proto import pb

from . import agent_injector, kube, manager_install
from .session import Session

log = logging.getLogger("tpnb.connector.intercepts")

ProgressFn = Callable[[str, str, float], None]

#: the header `--http-header=auto` adds (its value is unique to the session)
AUTO_HEADER = "x-tpnb-intercept"


def auto_header_value(session_id: str) -> str:
    """user-<12 hex>: stable for the session, unique to it, and revealing nothing of its id."""
    digest = hashlib.sha256(b"tpnb auto header\0" + session_id.encode()).hexdigest()[:12]
    try:
        user = "".join(c for c in getpass.getuser() if c.isalnum() or c in "-_.") or "user"
    except Exception:  # noqa: BLE001 - no passwd entry
        user = "user"
    return f"{user}-{digest}"


def resolve_filters(spec: pb.InterceptSpec, session_id: str) -> None:
    """`--http-header=auto` (a HeaderMatch with no name) becomes this session's own header;
    bad filters are refused before anything in the cluster changes."""
    for h in spec.http_headers:
        if not h.name:
            h.name, h.value = AUTO_HEADER, auto_header_value(session_id)
    bad = httpfilter.check(spec)
    if bad:
        raise InterceptError(f"invalid HTTP filter for {spec.name}", bad,
                             "e.g. --http-header x-user=alice, --http-path-prefix /api")


async def _port_listens(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def agent_on_workload(session: Session, spec: pb.InterceptSpec,
                            progress: ProgressFn) -> agent_injector.ServiceTarget:
    """The traffic-agent in spec's workload, its Service routing to it: what an intercept and a wiretap
    both need first.  Fills in spec's workload kind, Service and container as found."""
    cfg = tpnb_config.get()
    assert session.target is not None
    api = session.target.api
    progress("workload", f"Looking up {spec.namespace}/{spec.workload}...", 0.05)
    wl = await agent_injector.find_workload(api, spec.namespace, spec.workload)
    target = await agent_injector.resolve_service(api, wl, spec.service or None, spec.service_port or None,
                                                  spec.container or None)
    spec.workload_kind = wl.kind
    spec.service = target.service
    spec.container = target.container
    progress("workload", f"Using {wl.kind.lower()} {wl.name}", 0.1)
    await manager_install.preflight_intercept(session.target, spec.namespace, wl.kind, wl.name, target.service)
    first_time = not agent_injector.has_agent(wl.obj)
    image = cfg.agent.image or session.manager_image or cfg.agent_image
    changed = await agent_injector.inject_agent(api, wl, target, image, progress)
    await agent_injector.wait_rollout(api, wl, cfg.timeouts.rollout, progress)
    # a Service switched just now (e.g. restored by an earlier `leave`) needs kube-proxy's moment too
    await _wait_service_on_agent(api, spec.namespace, target, cfg.agent.port, first_time or bool(changed), progress)
    return target


async def intercept(session: Session, req: pb.InterceptRequest, progress: ProgressFn) -> pb.InterceptInfo:
    cfg = tpnb_config.get()
    spec = pb.InterceptSpec()
    spec.CopyFrom(req.spec)
    if not spec.workload:
        spec.workload = spec.name
    if not spec.name:
        spec.name = spec.workload
    spec.namespace = spec.namespace or (session.mapped[0] if session.mapped else "default")
    spec.target_host = spec.target_host or "127.0.0.1"
    if not 0 < spec.local_port < 65536:
        raise InterceptError(f"invalid local port {spec.local_port}", hint="use --port 1..65535")
    resolve_filters(spec, session.session_id)
    if spec.name in session.intercepts:
        raise InterceptError(f"intercept {spec.name!r} already exists in this session",
                             hint=f"`tpnb leave {spec.name}` first")
    if not req.skip_port_check and not await _port_listens(spec.target_host, spec.local_port):
        raise InterceptError(
            f"nothing listens on {spec.target_host}:{spec.local_port}",
            "the intercepted traffic would have nowhere to go",
            f"start your server on port {spec.local_port} first, or run it with "
            f"`tpnb intercept {spec.workload} --port {spec.local_port} -- CMD`")
    await agent_on_workload(session, spec, progress)
    ic = await session.create_intercept(spec)
    if req.owner_pid:
        session.tie_to_owner(spec.name, req.owner_pid)
    progress("agent", "Waiting for the traffic-agent to report in...", 0.9)
    deadline = anyio.current_time() + cfg.timeouts.intercept
    while ic.state != pb.InterceptInfo.ACTIVE:
        if ic.state == pb.InterceptInfo.ERROR:
            await session.remove_intercept(spec.name)
            raise InterceptError(f"cannot intercept {spec.namespace}/{spec.workload} with HTTP filters "
                                 f"({httpfilter.describe(spec)})", ic.message,
                                 f"intercept all of its connections instead: `tpnb intercept {spec.name} "
                                 f"--port {spec.local_port}` without --http-* options")
        if anyio.current_time() > deadline:
            await session.remove_intercept(spec.name)
            raise InterceptError(f"the traffic-agent of {spec.workload} did not report in",
                                 ic.message, f"check `kubectl -n {spec.namespace} logs deploy/{spec.workload} "
                                 "-c traffic-agent`")
        session.changed.clear()
        with anyio.move_on_after(1.0):
            await session.changed.wait()
        ic = session.intercepts.get(spec.name, ic)
    if session.agentlinks is not None and ic.links and session.agentlinks.enabled():
        # the first requests after we return should take the direct path (the manager's serves meanwhile)
        progress("agent", "Opening the agent link...", 0.95)
        if not await session.agentlinks.wait_up(ic.id, cfg.timeouts.agent_link):
            log.info("intercept %s: %s", spec.name, session.agentlinks.data_path(ic.id))
    return without_keys(ic)


def without_keys(ic: pb.InterceptInfo) -> pb.InterceptInfo:
    """`ic` as the connector hands it on (CLI, kernel): the agent links' keys stay in the connector."""
    if not ic.links:
        return ic
    out = pb.InterceptInfo()
    out.CopyFrom(ic)
    del out.links[:]
    return out


def endpoints_on_agent(slices: list[dict], port_name: str, agent_port: int) -> tuple[int, int, list[int]]:
    """(ready endpoints reaching the agent, ready endpoints reaching anything else, the ports seen)
    for the Service port named `port_name` ("" for a single unnamed port).  Pure.

    Only that port is looked at: the Service's other ports stay the app's, and a
    named targetPort resolves per pod, so a slice carries each port's number.
    """
    on = off = 0
    seen: set[int] = set()
    for sl in slices:
        ready = [e for e in sl.get("endpoints") or []
                 if (e.get("conditions") or {}).get("ready") is not False]
        if not ready:
            continue
        port = next((p.get("port") for p in sl.get("ports") or [] if (p.get("name") or "") == port_name), None)
        if port is None:
            continue
        seen.add(int(port))
        if int(port) == agent_port:
            on += len(ready)
        else:
            off += len(ready)
    return on, off, sorted(seen)


async def _wait_service_on_agent(api: object, namespace: str, target: agent_injector.ServiceTarget, agent_port: int,
                                 settle: bool, progress: ProgressFn) -> None:
    """Return once the intercepted Service port's endpoints are the agents, so the first request
    is intercepted.

    kube-proxy applies an EndpointSlice change a moment after it is published
    and nothing tells a client when (on every node: with several, one lags);
    after a change (`settle`: a first injection, or a Service switched now) we
    give it that moment (1.5 s) rather than let the first request reach the old port.
    """
    if target.headless:
        # no Service port moves: the pods' own redirect (in place once they rolled out) takes the traffic
        return
    service = target.service
    deadline = anyio.current_time() + 60
    said = False
    while True:
        try:
            slices = await anyio.to_thread.run_sync(agent_injector.endpoint_slices_sync, api, namespace, service)
        except Exception as exc:  # noqa: BLE001 - readiness is best effort; the intercept stands
            log.info("cannot read EndpointSlices of %s/%s: %s", namespace, service, exc)
            return
        on, off, ports = endpoints_on_agent(slices, target.port_name, agent_port)
        if on and not off:
            break
        if anyio.current_time() > deadline:
            log.warning("Service %s/%s port %s still routes to ports %s", namespace, service, target.port_key, ports)
            return
        if not said:
            said = True
            progress("endpoints", f"Waiting for Service {service} to route to the traffic-agent...", 0.85)
        await anyio.sleep(0.25)
    if settle:
        await anyio.sleep(1.5)


def all_intercepts(session: Session | None) -> list[pb.InterceptInfo]:
    """Every intercept the manager shows this session: its own in full, others' as workload + holder."""
    if session is None or session.link is None:
        return []
    return [*session.remote.values(), *session.others]


async def list_workloads(session: Session, namespace: str) -> pb.WorkloadList:
    assert session.target is not None
    items = await anyio.to_thread.run_sync(agent_injector.list_workloads, session.target.api, namespace)
    ics = all_intercepts(session)
    out = pb.WorkloadList()
    for it in items:
        w = out.workloads.add(name=it["name"], namespace=it.get("namespace", namespace), kind=it["kind"],
                              services=it.get("services", []), agent_installed=bool(it.get("agent_installed")))
        held = [ic for ic in ics if ic.spec.workload == w.name and ic.spec.namespace == w.namespace]
        if held:
            ic = held[0]
            w.intercept.CopyFrom(without_keys(ic))
            w.holder = ic.client_name
            w.state = pb.INTERCEPTED_BY_ME if ic.mine else pb.INTERCEPTED_BY_OTHER
        elif w.agent_installed:
            w.state = pb.AGENT_INSTALLED
        else:
            w.state = pb.FREE
    return out


async def uninstall(session: Session | None, req: pb.UninstallRequest, progress: ProgressFn) -> str:
    target = session.target if session is not None else None
    if target is None:
        conn = req.connection
        target = await anyio.to_thread.run_sync(kube.load_target, conn.kubeconfig or None, conn.context or None)
        await kube.check_reachable(target, tpnb_config.get().timeouts.api)
    ns = req.namespace or (session.mapped[0] if session and session.mapped else target.namespace or "default")
    if req.what == pb.UninstallRequest.AGENT:
        if not req.name:
            raise InterceptError("uninstall --agent needs a workload name", hint="tpnb uninstall --agent hello")
        if session is not None:
            for name, ic in list(session.intercepts.items()):
                if ic.spec.workload == req.name and ic.spec.namespace == ns:
                    await session.remove_intercept(name)
        await agent_injector.remove_agent(target.api, ns, req.name, progress)
        return f"Removed the traffic-agent from {ns}/{req.name}"
    if session is not None:
        for name in list(session.intercepts):
            await session.remove_intercept(name)
    removed = await agent_injector.remove_all_agents(target.api, progress)
    if req.what == pb.UninstallRequest.ALL_AGENTS:
        return f"Removed the traffic-agent from {len(removed)} workload(s)"
    await manager_install.uninstall_manager(target, progress)
    return f"Removed {len(removed)} traffic-agent(s) and the traffic-manager"
