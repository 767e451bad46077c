"""How a tpnb process serves its gRPC service on a Unix socket, and how it is started.

The connector and the root daemon differ in what they serve and who may
reach them (the socket's owner), not in how: socket, pidfile, signals, an
orderly stop that runs the process's own teardown before the socket goes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

import grpc

log = logging.getLogger("tpnb.serve")


async def serve_unix(sock: Path, add: Callable[[grpc.aio.Server], None], stop: asyncio.Event,
                     teardown: Callable[[], Awaitable[None]], what: str, owner_uid: int | None = None) -> None:
    """Serve on `sock` (mode 0600, owned by `owner_uid` when given) until `stop` or a signal."""
    if sock.exists():
        sock.unlink()
    server = grpc.aio.server()
    add(server)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    if owner_uid is not None:
        os.chown(sock, owner_uid, -1)
    os.chmod(sock, 0o600)
    pidfile = sock.with_name(sock.stem + ".pid")
    pidfile.write_text(str(os.getpid()))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    log.info("tpnb %s listening on %s (pid %d, uid %d)", what, sock, os.getpid(), os.getuid())
    try:
        await stop.wait()
    finally:
        log.info("%s stopping", what)
        try:
            await teardown()
        finally:
            await server.stop(1)
            for p in (sock, pidfile):
                try:
                    Path(p).unlink()
                except FileNotFoundError:
                    pass
        log.info("%s stopped", what)


def main(log_file: str, serve: Callable[[], Awaitable[None]]) -> int:
    """The `python -m tpnb.<process>` entry: config, one log file, then serve."""
    from tpnb import config as tpnb_config
    from tpnb.errors import TpnbError

    from . import logs

    try:
        cfg = tpnb_config.get()
    except TpnbError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    logs.setup(cfg.log_dir, log_file, os.environ.get("TPNB_LOG_LEVEL", cfg.logs.level))
    asyncio.run(serve())
    return 0
