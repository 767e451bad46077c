"""`python3 -m tpnb.cluster manager|agent`: the image's entrypoint."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("manager", "agent"):
        print("usage: python3 -m tpnb.cluster manager|agent", file=sys.stderr)
        return 2
    if argv[0] == "manager":
        from .manager import main as run
    else:
        from .agent import main as run
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
