"""`python3 -m tpnb.cluster.redirect`: the traffic-agent's init container for headless Services.

Clients of a headless Service (clusterIP: None) resolve the pod IPs and connect
to the app's port directly, so pointing a Service's targetPort at the agent
does not reach them.  This init container, which alone holds NET_ADMIN (the
agent itself never does), adds one nftables rule to the pod's network
namespace before the app starts: TCP arriving from outside the pod for
APP_PORT is redirected to AGENT_PORT, where the agent forwards it to the app
(127.0.0.1:APP_PORT, which the rule does not touch: loopback traffic never
passes prerouting) or to the intercepting laptop.

Traffic from the pod's default gateway -- the node itself, which is where the
kubelet's probes come from -- is left alone, so probes keep reaching the app
even while the port is intercepted.  The rule lives as long as the pod's
network namespace; removing the agent rolls the pods and takes it away.

Uses Debian's `nft` (nftables), the kernel's own netfilter front end.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import sys

TABLE = "tpnb_agent"


def default_gateway(route_table: str) -> str | None:
    """The IPv4 default gateway from /proc/net/route's text, or None."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:  # RTF_GATEWAY
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def ruleset(app_port: int, agent_port: int, gateway: str | None) -> str:
    """The nft script (replaces an earlier copy of our table, so a restarted init container is harmless)."""
    skip = f"ip saddr != {ipaddress.IPv4Address(gateway)} " if gateway else ""
    return (f"table ip {TABLE}\ndelete table ip {TABLE}\n"
            f"table ip {TABLE} {{\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    {skip}tcp dport {int(app_port)} redirect to :{int(agent_port)}\n"
            "  }\n"
            "}\n")


def main() -> int:
    app_port, agent_port = int(os.environ["APP_PORT"]), int(os.environ["AGENT_PORT"])
    with open("/proc/net/route") as f:
        gateway = default_gateway(f.read())
    script = ruleset(app_port, agent_port, gateway)
    r = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True, check=False)
    if r.returncode != 0:
        print(f"tpnb redirect: nft failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"tpnb redirect: TCP to port {app_port} from other pods -> {agent_port}"
          + (f" (not from the node, {gateway})" if gateway else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
