"""`python -m tpnb.daemon`: the root daemon (system-wide outbound networking only).

Started by `tpnb connect` (through sudo when the user is not root) when
system-wide outbound is wanted; logs go to ~/.cache/tpnb/logs/daemon.log of
the user who started it.  It holds no Kubernetes credentials.
"""
from __future__ import annotations

import os
import sys


def main() -> int:
    if os.geteuid() != 0:
        print("tpnb daemon must run as root (it creates a TUN device and routes)", file=sys.stderr)
        return 3
    from tpnb.common.serve import main as serve_main

    from .server import serve

    return serve_main("daemon.log", serve)


if __name__ == "__main__":
    sys.exit(main())
