"""Crash-safe record of what the daemon changed in the network namespace.

The daemon writes ``/run/tpnb/<netns inode>/state.json`` *before* each change
(TUN name, routes, resolv.conf backup).  If it dies - kill -9, OOM, a
segfault in the TUN engine - the next daemon start, or ``tpnb uninstall``,
calls `recover()` and undoes what the record lists.  Recording intent before
acting means the record may list a change that never happened; undoing a
change that is not there is a no-op, so that is safe.  The reverse (a change
without a record) cannot happen.

/run is a tmpfs: after a reboot there is nothing to undo, and nothing stale.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import redirect, routes
from .resolvconf import ResolvConf, ResolvedLink, default_state_dir, write_atomic
from tpnb.common.liveness import process_alive, start_ticks as _start_ticks

log = logging.getLogger(__name__)

STATE_NAME = "state.json"


@dataclass
class NetState:
    """What one daemon changed (or was about to change)."""

    pid: int = field(default_factory=os.getpid)
    pid_start: int | None = None
    tun_name: str | None = None
    routes: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    #: the ResolvConf state dir holding the backup, when resolv.conf was rewritten
    resolv_state_dir: str | None = None
    resolv_path: str | None = None
    #: the TUN name when systemd-resolved per-link DNS was configured
    resolved_link: str | None = None
    #: the nftables table (family ip) of the kernel-TCP redirect
    nft_table: str | None = None

    def owner_alive(self) -> bool:
        """The recording daemon still runs (same pid *and* same start time)."""
        if self.pid == os.getpid():
            return False  # it is us: whatever is recorded is a previous life
        return process_alive(self.pid, self.pid_start)


class StateFile:
    """The state record of one network namespace; every update is durable."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.path = self.state_dir / STATE_NAME
        self.state = NetState(pid_start=_start_ticks(os.getpid()))

    def load(self) -> NetState | None:
        """The record on disk, or None (missing or unreadable: nothing to undo)."""
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return None
        known = NetState.__dataclass_fields__
        return NetState(**{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        write_atomic(self.path, json.dumps(asdict(self.state), indent=1).encode(), 0o644)

    def clear(self) -> None:
        """Everything was undone cleanly: forget the record."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # The record_* calls come BEFORE the change they describe.
    def record_tun(self, name: str) -> None:
        self.state.tun_name = name
        self.save()

    def record_routes(self, cidrs: list[str]) -> None:
        self.state.routes = sorted(set(self.state.routes) | set(cidrs))
        self.save()

    def forget_routes(self, cidrs: list[str]) -> None:
        """After a successful removal."""
        self.state.routes = [r for r in self.state.routes if r not in set(cidrs)]
        self.save()

    def record_address(self, cidr: str) -> None:
        if cidr not in self.state.addresses:
            self.state.addresses.append(cidr)
        self.save()

    def record_resolv(self, rc: ResolvConf) -> None:
        self.state.resolv_state_dir = str(rc.state_dir)
        self.state.resolv_path = rc.path
        self.save()

    def record_nft_table(self, table: str) -> None:
        self.state.nft_table = table
        self.save()

    def record_resolved(self, ifname: str) -> None:
        self.state.resolved_link = ifname
        self.save()


async def recover(state_dir: Path | None = None, *, prefix: str = "tpnb",
                  resolv_path: str = "/etc/resolv.conf") -> list[str]:
    """Undo what a dead daemon of this network namespace left behind.

    Returns a description of each thing undone ([] when it was clean).  If
    the recorded daemon is still alive nothing is touched and
    `tpnb.errors.DaemonError` is raised: two daemons must not share a netns.
    Leftover ``prefix*`` TUN devices are removed even without a record, and a
    tpnb-generated ``resolv_path`` whose writer is dead is restored from the
    original embedded in it even when the backup under /run is gone.
    """
    sf = StateFile(state_dir)
    st = await asyncio.to_thread(sf.load)
    done: list[str] = []
    if st is not None and st.owner_alive():
        from tpnb.errors import DaemonError

        raise DaemonError(
            f"another tpnb daemon (pid {st.pid}) is running in this network namespace",
            f"its record {sf.path} says it owns {st.tun_name or 'no device yet'}",
            f"stop it first (`tpnb quit`, or `kill {st.pid}`)",
        )
    if st is not None:
        if st.nft_table and await redirect.delete_table(st.nft_table):
            done.append(f"nft table ip {st.nft_table}")
        if st.tun_name:
            if st.routes and await routes.link_exists(st.tun_name):
                await routes.remove_routes(st.tun_name, st.routes)
                done += [f"route {r} dev {st.tun_name}" for r in st.routes]
            if await routes.delete_link(st.tun_name):
                done.append(f"link {st.tun_name}")
        if st.resolved_link:
            await asyncio.to_thread(ResolvedLink(st.resolved_link).restore)
        if st.resolv_state_dir:
            if await asyncio.to_thread(ResolvConf.recover_stale, Path(st.resolv_state_dir)):
                done.append(f"resolv.conf {st.resolv_path}")
    # A resolv.conf backup without a state record (crash between the two writes)
    rc_dir = sf.state_dir
    if (st is None or st.resolv_state_dir != str(rc_dir)) and await asyncio.to_thread(ResolvConf.recover_stale, rc_dir):
        done.append("resolv.conf")
    # Our file with no backup at all (reboot while connected: /run was wiped)
    if not any(d.startswith("resolv.conf") for d in done) and await asyncio.to_thread(ResolvConf.recover_file, resolv_path):
        done.append(f"resolv.conf {resolv_path} (from the embedded copy)")
    for name in await routes.cleanup_stale(prefix):
        done.append(f"link {name}")
    done += await redirect.cleanup_stale(prefix)
    await asyncio.to_thread(sf.clear)
    if done:
        log.warning("cleaned up after a previous daemon: %s", "; ".join(done))
    return done


__all__ = ["NetState", "StateFile", "recover", "STATE_NAME"]
