"""The connector's gRPC service on a Unix socket: what every face (CLI, magics, panel) talks to.

One connector per user and network namespace ("machine"); it holds at most
one session.  Long operations stream `Progress` events so the CLI can draw a
progress line and the notebook a widget, from the same data.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import grpc

from tpnb import config as tpnb_config
from tpnb.errors import NotConnected, TpnbError
from tpnb.proto import pb, rpc
from tpnb.version import API_VERSION, __version__

from tpnb.common import errors_wire, logs
from tpnb.common.liveness import process_alive
from tpnb.common.serve import serve_unix

from . import intercepts, wiretaps
from .session import Session

log = logging.getLogger("tpnb.connector.server")


class _Stream:
    """Runs an operation as a task and turns its progress callbacks into events."""

    def __init__(self, make_event: Callable[[pb.Progress], object]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.make_event = make_event

    def progress(self, step: str, message: str, fraction: float = -1.0) -> None:
        self.queue.put_nowait(self.make_event(pb.Progress(step=step, message=message, fraction=fraction)))

    async def run(self, op: Awaitable[object], done: Callable[[object], object],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        task = asyncio.ensure_future(op)
        getter: asyncio.Task | None = None
        try:
            while True:
                getter = asyncio.ensure_future(self.queue.get())
                finished, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    yield getter.result()
                    continue
                getter.cancel()
                while not self.queue.empty():
                    yield self.queue.get_nowait()
                break
            try:
                result = task.result()
            except TpnbError as err:
                code, details = errors_wire.encode(err)
                await context.abort(code, details)
                return
            yield done(result)
        finally:
            if getter is not None:
                getter.cancel()


class ConnectorService(rpc.ConnectorServicer):
    def __init__(self, stop: asyncio.Event) -> None:
        self.session: Session | None = None
        self.stop = stop
        self.lock = asyncio.Lock()
        self.status_changed = asyncio.Event()
        self._relay: asyncio.Task | None = None

    async def _abort(self, context: grpc.aio.ServicerContext, err: TpnbError) -> None:
        code, details = errors_wire.encode(err)
        await context.abort(code, details)

    def _require(self) -> Session:
        if self.session is None:
            raise NotConnected("not connected", "there is no session with a cluster",
                               "run `tpnb connect` (or `%tp connect` in a notebook) first")
        return self.session

    async def Version(self, request, context):  # noqa: N802
        out = pb.VersionList(versions=[pb.VersionInfo(name="daemon", version=__version__, api=API_VERSION)])
        if self.session is not None and self.session.rootd is not None:
            net = await self.session.rootd.network()
            if net is not None:
                out.versions.append(pb.VersionInfo(name="root-daemon", version=net.version, api=API_VERSION))
        if self.session is not None and self.session.link is not None:
            out.versions.append(pb.VersionInfo(name="traffic-manager", version=self.session.link.version,
                                               api=API_VERSION))
        return out

    async def Connect(self, request, context):  # noqa: N802
        stream = _Stream(lambda p: pb.ConnectEvent(progress=p))

        async def op() -> pb.ConnectionStatus:
            async with self.lock:
                if self.session is not None:
                    same = (self.session.request.kubeconfig == request.kubeconfig
                            and self.session.request.context == request.context)
                    if same:
                        # the root daemon may have been restarted (or newly allowed) since
                        await self.session.attach_root_daemon(request.daemon_socket, request.outbound_note)
                        stream.progress("connected", "Already connected", 1.0)
                        return await self.session.status()
                    raise NotConnected("already connected to another cluster context",
                                       f"the session uses {(await self.session.status()).context}",
                                       "run `tpnb quit` first")
                sess = Session(request)
                try:
                    await sess.start(stream.progress)
                except BaseException:
                    await sess.close()
                    raise
                self.session = sess
                self._relay = asyncio.ensure_future(self._relay_changes(sess))
                return await sess.status()

        async for ev in stream.run(op(), lambda st: pb.ConnectEvent(done=st), context):
            yield ev

    async def _relay_changes(self, sess: Session) -> None:
        while self.session is sess:
            await sess.changed.wait()
            sess.changed.clear()
            self.status_changed.set()

    async def Status(self, request, context):  # noqa: N802
        if self.session is None:
            return pb.ConnectionStatus(connected=False, daemon_version=__version__)
        st = await self.session.status()
        st.wiretaps.extend(wiretaps.infos(self.session))
        return st

    async def WatchStatus(self, request, context):  # noqa: N802
        while True:
            self.status_changed.clear()
            yield await self.Status(request, context)
            try:
                await asyncio.wait_for(self.status_changed.wait(), 15)
            except asyncio.TimeoutError:
                pass

    async def _disconnect(self) -> None:
        sess, self.session = self.session, None
        if self._relay is not None:
            self._relay.cancel()
            self._relay = None
        if sess is not None:
            await sess.close()
        self.status_changed.set()

    async def Quit(self, request, context):  # noqa: N802
        async with self.lock:
            rootd_socket = self.session.rootd.socket_path if self.session and self.session.rootd else ""
            await self._disconnect()
        if request.stop_daemon:
            if rootd_socket:  # the root daemon goes with its connector
                from .rootd import RootDaemonLink

                link = RootDaemonLink(rootd_socket)
                try:
                    await link.quit()
                finally:
                    await link.aclose()
            self.stop.set()
        return pb.Empty()

    async def List(self, request, context):  # noqa: N802
        try:
            sess = self._require()
            ns = request.namespace or (sess.mapped[0] if sess.mapped else "default")
            out = await intercepts.list_workloads(sess, ns)
            taps = wiretaps.infos(sess)
            for w in out.workloads:
                w.wiretaps.extend(t for t in taps if t.spec.workload == w.name and t.spec.namespace == w.namespace)
            return out
        except TpnbError as err:
            await self._abort(context, err)

    async def Intercept(self, request, context):  # noqa: N802
        stream = _Stream(lambda p: pb.InterceptEvent(progress=p))

        async def op() -> pb.InterceptInfo:
            return await intercepts.intercept(self._require(), request, stream.progress)

        async for ev in stream.run(op(), lambda ic: pb.InterceptEvent(done=ic), context):
            yield ev

    async def Leave(self, request, context):  # noqa: N802
        try:
            sess = self._require()
            if request.name not in sess.intercepts and await wiretaps.stop(request.name):
                return pb.Empty()  # a wiretap of that name (an intercept's name wins)
            await sess.remove_intercept(request.name)
        except TpnbError as err:
            await self._abort(context, err)
        return pb.Empty()

    async def Wiretap(self, request, context):  # noqa: N802
        """A wiretap for the life of this call (connector/wiretaps.py)."""
        try:
            tap = wiretaps.Wiretap(self._require(), request)
        except TpnbError as err:
            await self._abort(context, err)
            return
        stream = _Stream(lambda p: pb.WiretapEvent(progress=p))
        try:
            async for ev in stream.run(tap.start(stream.progress), lambda info: pb.WiretapEvent(started=info),
                                       context):
                yield ev
            async for ev in tap.relay():
                yield ev
        finally:
            # the face may be gone (cancelled call): remove in a task of its own, not cut short
            removal = asyncio.ensure_future(tap.remove())
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(removal)

    async def Uninstall(self, request, context):  # noqa: N802
        stream = _Stream(lambda p: pb.UninstallEvent(progress=p))

        async def op() -> str:
            msg = await intercepts.uninstall(self.session, request, stream.progress)
            if request.what == pb.UninstallRequest.EVERYTHING:
                async with self.lock:
                    await self._disconnect()
            return msg

        async for ev in stream.run(op(), lambda msg: pb.UninstallEvent(done=msg), context):
            yield ev

    async def ForwardToCluster(self, request, context):  # noqa: N802
        try:
            port = await self._require().local_forward(request.ip, request.port, request.intercept_id)
        except TpnbError as err:
            await self._abort(context, err)
            return pb.ForwardReply()
        return pb.ForwardReply(local_port=port)

    async def ResolveName(self, request, context):  # noqa: N802
        try:
            return await self._require().resolve_name(request.name)
        except TpnbError as err:
            await self._abort(context, err)
            return pb.ResolveReply()

    async def SetLogLevel(self, request, context):  # noqa: N802
        try:
            logs.set_level(request.level)
        except TpnbError as err:
            await self._abort(context, err)
        if self.session is not None and self.session.rootd is not None:
            await self.session.rootd.set_log_level(request)
        if self.session is not None and self.session.link is not None:
            try:
                await self.session.link.stub.SetLogLevel(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                log.info("manager log level not changed: %s", exc.details())
        return pb.Empty()


def _remove_stale_relays(directory: Path) -> None:
    """Relay sockets (`manager-<pid>-<n>.sock`) of connectors that died without cleaning up (kill -9)."""
    for path in directory.glob("manager-*.sock"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("removed the relay socket %s of a dead connector", path.name)


async def serve() -> None:
    sock = tpnb_config.get().connector_socket
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stale_relays(sock.parent)
    stop = asyncio.Event()
    svc = ConnectorService(stop)
    await serve_unix(sock, lambda server: rpc.add_ConnectorServicer_to_server(svc, server), stop,
                     svc._disconnect, "connector")
