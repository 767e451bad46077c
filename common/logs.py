"""One log file per process, levels changeable at runtime.

The connector writes `connector.log` (kubeconfig, traffic-manager link,
port-forward, intercepts) and the root daemon `daemon.log` (TUN, routes,
nftables, DNS, resolv.conf): the split Telepresence users know, now because
they are two processes.  Both live in the invoking user's log directory; the
root daemon chowns its file to that user so `tpnb` can show it.
"""
from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(log_dir: Path, filename: str, level: str = "info") -> None:
    """Send every record of this process to `log_dir/filename`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    owner = os.environ.get("TPNB_OWNER_UID")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    path = log_dir / filename
    handler = RotatingFileHandler(path, maxBytes=10 * 1024 * 1024, backupCount=2)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    if owner and owner.isdigit() and os.geteuid() == 0:
        try:
            os.chown(path, int(owner), -1)
        except OSError:
            pass
    set_level(level)
    # grpc and websockets are chatty at debug; keep them at warning unless asked
    for noisy in ("websockets", "kubernetes", "urllib3", "asyncio", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    lvl = getattr(logging, level.upper(), None)
    if not isinstance(lvl, int):
        from tpnb.errors import ConfigError

        raise ConfigError(f"unknown log level {level!r}", hint="use one of debug, info, warning, error")
    logging.getLogger().setLevel(lvl)
