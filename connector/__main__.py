"""`python -m tpnb.connector`: the user-level connector.

Started by `tpnb connect` as the invoking user (never through sudo): it reads
the user's kubeconfig and runs its exec credential plugins as that user.
Logs go to ~/.cache/tpnb/logs/connector.log.
"""
from __future__ import annotations

import sys


def main() -> int:
    from tpnb.common.serve import main as serve_main

    from .server import serve

    return serve_main("connector.log", serve)


if __name__ == "__main__":
    sys.exit(main())
