"""tpnb: Telepresence-style local development for Kubernetes, driven from Jupyter.

Import root for every process's code:
  tpnb.*           the faces (API, CLI, magics, widgets)         - folder tpnb/
  tpnb.connector   the user-level connector (Kubernetes side)    - folder connector/
  tpnb.daemon      the root daemon (system-wide outbound only)   - folder daemon/
  tpnb.cluster     traffic-manager and traffic-agent (in pods)   - folder cluster/
  tpnb.common      code all of them share                        - folder common/
This module stays import-light: the cluster image imports it too.
"""
from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension", "panel", "requests_log", "replay"]


def __getattr__(name: str):  # noqa: ANN202 - lazy, so the cluster image never imports widgets
    """`tpnb.panel()` and `tpnb.requests_log()` without `%load_ext tpnb` first."""
    if name == "panel":
        from .widgets import panel

        return panel
    if name == "requests_log":  # a pandas DataFrame when pandas is installed, else plain records
        from .inkernel import requests_table

        return requests_table
    if name == "replay":
        from .inkernel import replay

        return replay
    raise AttributeError(f"module 'tpnb' has no attribute {name!r}")


def load_ipython_extension(ipython):  # pragma: no cover - thin shim
    """`%load_ext tpnb` registers the %tp / %%tp magics."""
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):  # pragma: no cover - thin shim
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
