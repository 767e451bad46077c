"""The daemon's two log files.

One process does both jobs Telepresence splits in two, but the logs keep the
familiar split: `daemon.log` for the network side (TUN, routes, DNS,
resolv.conf) and `connector.log` for the Kubernetes side (kubeconfig,
traffic-manager, port-forward, intercepts).  Levels can change at runtime.
"""
from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path

NET_LOGGERS = ("tpnb.daemon.tun", "tpnb.daemon.routes", "tpnb.daemon.dns", "tpnb.daemon.resolvconf",
               "tpnb.daemon.netstate", "tpnb.daemon.outbound", "daemon.tun", "daemon.dns")

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _NetFilter(logging.Filter):
    def __init__(self, net: bool) -> None:
        super().__init__()
        self.net = net

    def filter(self, record: logging.LogRecord) -> bool:
        is_net = record.name.startswith(NET_LOGGERS) or "tun" in record.name.split(".")[-1:]
        return is_net == self.net


def setup(log_dir: Path, level: str = "info") -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    owner = os.environ.get("TPNB_OWNER_UID")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for name, net in (("daemon.log", True), ("connector.log", False)):
        path = log_dir / name
        handler = RotatingFileHandler(path, maxBytes=10 * 1024 * 1024, backupCount=2)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_NetFilter(net))
        root.addHandler(handler)
        if owner and owner.isdigit():
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
