"""`python -m tpnb.connector`: the user-level connector.

Started by `tpnb connect` as the invoking user (never through sudo): it reads
the user's kubeconfig and runs its exec credential plugins as that user.
Logs go to ~/.cache/tpnb/logs/connector.log.
"""
from __future__ import annotations

import asyncio
import os
import sys

from tpnb import config as tpnb_config
from tpnb.errors import TpnbError


def main() -> int:
    try:
        cfg = tpnb_config.get()
    except TpnbError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    from tpnb.common import logs

    from . import server

    logs.setup(cfg.log_dir, "connector.log", os.environ.get("TPNB_LOG_LEVEL", cfg.logs.level))
    asyncio.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
