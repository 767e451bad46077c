"""The one version string, shared by client, daemon, manager and agent."""
from __future__ import annotations

__version__ = "0.1.0"
#: protocol generation (see tpnb/proto/tpnb.proto)
API_VERSION = 2
