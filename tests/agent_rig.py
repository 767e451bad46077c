"""Scaffolding of the traffic-agent's loopback tests (test_httproute_unit, test_h2route_unit,
test_wiretap_unit): tagged HTTP servers for the app and the laptops, the fake manager that routes
each intercept's tunnels to its laptop, intercept specs, and a real agent started against a fake
manager and stopped again -- one copy, so the three files start and stop agents the same way.
"""
from __future__ import annotations

import asyncio
import http.server
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tpnb.cluster import agent as agent_mod
from tpnb.common.forward import GrpcFrameChannel, bridge, error_frame
from tpnb.proto import pb

from test_agent_unit import FakeManager, _free_port, _start_manager, _until


class _Tagged(http.server.BaseHTTPRequestHandler):
    """Answers "TAG METHOD PATH BODYLENGTH" with an X-Served-By: TAG header (keep-alive)."""

    protocol_version = "HTTP/1.1"
    tag = "?"

    def _answer(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        out = f"{self.tag} {self.command} {self.path} {len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Served-By", self.tag)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *a: Any) -> None:
        pass


def http_server(tag: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    """A started HTTP server on 127.0.0.1 that says who it is (`_Tagged`), and its port."""
    handler = type(f"H{tag}", (_Tagged,), {"tag": tag})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


class RoutingManager(FakeManager):
    """Each intercept's tunnels reach its own laptop port; records the app protocol reports."""

    def __init__(self, ports: dict[str, int]) -> None:
        super().__init__(0)
        self.ports = ports
        self.protocols: list[str] = []

    async def AgentRemain(self, request: pb.AgentSession, context: Any) -> pb.Empty:  # noqa: N802
        if request.app_protocol:
            self.protocols.append(request.app_protocol)
        return await super().AgentRemain(request, context)

    async def Tunnel(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        chan = GrpcFrameChannel(context)
        first = await chan.recv()
        assert first is not None and first.WhichOneof("kind") == "open"
        self.opens.append(first.open)
        port = self.ports.get(first.open.intercept_id)
        if port is None or self.refuse:
            await chan.send(error_frame("client port not listening"))
            return
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await chan.send(pb.TunnelFrame(opened=pb.Empty()))
        await bridge(r, w, chan, linger=0)


def intercept_spec(name: str, headers: dict[str, str] | None = None, **paths: str) -> pb.InterceptSpec:
    """An intercept (or wiretap) spec of workload hello with these header and path filters."""
    return pb.InterceptSpec(name=name, workload="hello",
                            http_headers=[pb.HeaderMatch(name=k, value=v) for k, v in (headers or {}).items()],
                            **paths)


def quiet_agent(monkeypatch: pytest.MonkeyPatch, remain: float | None = 0.3) -> None:
    """No /proc environment to read here; `remain`: a shorter AgentRemain interval (None: the default)."""
    monkeypatch.setattr(agent_mod, "app_environment", lambda s, proc=None: {})
    if remain is not None:
        monkeypatch.setattr(agent_mod, "REMAIN_INTERVAL", remain)


@dataclass
class RunningAgent:
    """A real traffic-agent in front of `app_port`, arrived at a fake manager served on loopback."""

    agent: agent_mod.Agent
    session: asyncio.Future[Any]
    server: Any
    settings: agent_mod.AgentSettings

    @property
    def port(self) -> int:
        """Where the agent takes the app's connections."""
        return self.settings.agent_port

    async def close(self) -> None:
        self.session.cancel()
        await asyncio.gather(self.session, return_exceptions=True)
        await self.agent.stop()
        await self.server.stop(0)


async def start_agent(fake: FakeManager, app_port: int, tmp_path: Path, name: str = "hello",
                      arrived: bool = True) -> RunningAgent:
    """Serve `fake` on a free port and start an agent of workload `name` for it; `arrived`: wait
    until the manager gave it an agent id."""
    token = tmp_path / "token"
    token.write_text("t\n")
    mgr_port = _free_port()
    server = await _start_manager(fake, mgr_port)
    settings = agent_mod.AgentSettings(
        name=name, namespace="default", pod_name=f"{name}-1", pod_ip="10.42.0.9", app_container="app",
        app_port=app_port, agent_port=_free_port(), health_port=0, manager_host="127.0.0.1",
        manager_port=mgr_port, token_file=str(token))
    ag = agent_mod.Agent(settings)
    await ag.start()
    running = RunningAgent(ag, asyncio.ensure_future(ag.session_loop()), server, settings)
    if arrived:
        try:
            await _until(lambda: ag.agent_id is not None, 20)
        except BaseException:
            await running.close()
            raise
    return running
