"""Two task-group shapes every flow needs, shared by manager, agent and daemon.

Plain asyncio so the cluster image (no anyio) can use it too.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable, Sequence

log = logging.getLogger("tpnb.flow")


async def both(*coros: Awaitable[None]) -> None:
    """Run all until every one finishes; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except Exception as exc:  # noqa: BLE001 - a flow ending badly is routine
        log.debug("flow ended: %s", exc)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first(*coros: Awaitable[None]) -> None:
    """Run all until the first one returns, then cancel the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def undo(steps: Sequence[tuple[str, Callable[[], Awaitable[None]]]], logger: logging.Logger) -> None:
    """Run each (what, step) in order; a failing step is logged and the rest still run.

    The shape of every close() that takes down what a start() built: one
    broken piece (a route already gone, a dead channel) must never leave the
    others in place.
    """
    for what, step in steps:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - keep undoing the rest
            logger.error("cleanup of %s failed: %s", what, exc)


def oserror_text(exc: OSError) -> str:
    """asyncio's connect errors say "Connect call failed"; the errno says why."""
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return exc.strerror or str(exc)
