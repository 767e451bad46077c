"""`python -m tpnb.daemon`: the privileged per-machine daemon.

Started by `tpnb connect` (through sudo when the user is not root); logs go to
~/.cache/tpnb/logs/{daemon,connector}.log of the user who started it.
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
    from . import logs, server

    logs.setup(cfg.log_dir, os.environ.get("TPNB_LOG_LEVEL", cfg.logs.level))
    asyncio.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
