"""`python -m tpnb.daemon`: the root daemon (system-wide outbound networking only).

Started by `tpnb connect` (through sudo when the user is not root) when
system-wide outbound is wanted; logs go to ~/.cache/tpnb/logs/daemon.log of
the user who started it.  It holds no Kubernetes credentials.
"""
from __future__ import annotations

import asyncio
import os
import sys

from tpnb import config as tpnb_config
from tpnb.errors import TpnbError


def main() -> int:
    if os.geteuid() != 0:
        print("tpnb daemon must run as root (it creates a TUN device and routes)", file=sys.stderr)
        return 3
    try:
        cfg = tpnb_config.get()
    except TpnbError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    from tpnb.common import logs

    from . import server

    logs.setup(cfg.log_dir, "daemon.log", os.environ.get("TPNB_LOG_LEVEL", cfg.logs.level))
    asyncio.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
