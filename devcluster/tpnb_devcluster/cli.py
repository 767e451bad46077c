"""`tpnb devcluster up|status|kubeconfig|user|helm-path|laptop|image|config|remove-node|down`.

`main(argv)` is what `tpnb devcluster ...` dispatches to (argv without the
leading "devcluster"); `python -m tpnb_devcluster.cli ...` runs it directly.
Every user-facing failure is a TpnbError: it is printed as its short
what/why/fix text and turned into the error's exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from tpnb.errors import ConfigError, run_reporting


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpnb devcluster",
        description="A real Kubernetes (one node, or more with `up --nodes N`) inside network namespaces "
                    "on this machine, "
                    "plus 'laptop' namespaces that reach only its API server.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    upp = sub.add_parser("up", help="build (first time) and boot the cluster; prints the kubeconfig path",
                         description="Boots the cluster, or checks it and brings its images up to date when "
                                     "it runs.  With --nodes N a running cluster gets the nodes it lacks; "
                                     "nodes are never removed here (see remove-node).")
    upp.add_argument("--nodes", type=int, default=None, metavar="N",
                     help="how many nodes (default: devcluster.nodes, see `tpnb devcluster config`)")
    sub.add_parser("status", help="what runs, node and CoreDNS readiness, laptops")
    sub.add_parser("kubeconfig", help="print the path of the dev cluster's kubeconfig")
    lp = sub.add_parser("laptop", help="run a command in a laptop namespace (default: a shell)",
                        description="Runs CMD inside laptop namespace tpnb-NAME (created if needed) "
                                    "with KUBECONFIG, kubectl and tpnb set up. Example: "
                                    "tpnb devcluster laptop -- kubectl get nodes")
    lp.add_argument("--name", default="laptop", help="laptop name (default: laptop)")
    lp.add_argument("--remove", action="store_true", help="delete this laptop namespace instead")
    lp.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="command to run (default: $SHELL)")
    up_ = sub.add_parser("user", help="print the path of a kubeconfig for another Kubernetes user (made if needed)",
                         description="Writes a kubeconfig whose user is a client certificate with CN=NAME and "
                                     "O=each GROUP, signed by the dev cluster's CA (same server as "
                                     "`tpnb devcluster kubeconfig`), and prints its path.  The user may do "
                                     "nothing until RBAC grants it something, e.g. "
                                     "`kubectl create rolebinding ... --user NAME`.")
    up_.add_argument("name", metavar="NAME", help="the user name (certificate CN)")
    up_.add_argument("--group", "-g", action="append", default=[], metavar="G",
                     help="a group (certificate O); repeat for several")
    sub.add_parser("helm-path", help="print the path of the helm CLI built from source (built if needed)")
    ip = sub.add_parser("image", help="build the project image as an archive for another cluster",
                        description="Builds the traffic-manager/agent image (no Docker needed) and copies the "
                                    "docker-archive to FILE, for `kind load image-archive FILE`, "
                                    "`k3d image import FILE`, `minikube image load FILE` or `docker load -i FILE`.")
    ip.add_argument("--output", "-o", required=True, metavar="FILE")
    sub.add_parser("config", help="show the dev cluster's settings (the `devcluster` section of tpnb's "
                                  "config file) and where each came from")
    rp = sub.add_parser("remove-node", help="drain an added node and remove it with every trace of it",
                        description="Drains node NAME (its pods move to the other nodes), stops its kubelet, "
                                    "kube-proxy and containerd, and deletes its Node, namespace, veth, mounts "
                                    "and cgroups.  The first node runs the control plane and stays.")
    rp.add_argument("name", metavar="NAME", help="the node, e.g. tpnb-node2 (`tpnb devcluster status` lists them)")
    dp = sub.add_parser("down", help="stop everything and remove all traces (keeps build caches)")
    dp.add_argument("--purge", action="store_true",
                    help="also delete the state dir (binaries, images, certificates)")
    return p


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(args_in)
    except SystemExit as exc:  # --help or a usage error: argparse has printed it
        return int(exc.code or 0) if isinstance(exc.code, int) else ConfigError.exit_code
    return run_reporting(lambda: _run(args))


def _export_image(output: str) -> int:
    import shutil

    from . import images
    from .progress import Printer

    printer = Printer()
    try:
        built = images.build_tpnb_image(printer)
    finally:
        printer.done()
    try:
        shutil.copyfile(built.tar, output)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}", exc.strerror or str(exc), "choose a writable path") from None
    print(f"{built.name} -> {output}")
    print("load it into your cluster (e.g. `kind load image-archive FILE`); the client expects that tag "
          "(`tpnb config view` shows manager.image)", file=sys.stderr)
    return 0


def _show_config() -> int:
    """Like `tpnb config view`, for the section tpnb itself no longer carries."""
    from tpnb.config import config_file

    from . import config

    cfg = config.get()
    print(f"{config.SECTION}:")
    for k, v in cfg.as_dict().items():
        src = cfg.sources.get(f"{config.SECTION}.{k}", "default")
        print(f"  {k}: {v!r}" + ("" if src == "default" else f"   # from {src}"))
    print(f"# file: {config_file()}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .cluster import DevCluster
    from .progress import Printer

    if args.cmd == "config":
        return _show_config()
    if args.cmd == "user":
        from .users import user_kubeconfig

        print(user_kubeconfig(args.name, args.group))
        return 0
    if args.cmd == "helm-path":
        from . import helm

        printer = Printer()
        try:
            path = helm.ensure(printer)
        finally:
            printer.done()
        print(path)
        return 0
    cluster = DevCluster()
    if args.cmd == "kubeconfig":
        print(cluster.kubeconfig_path)
        return 0
    if args.cmd == "status":
        st = cluster.status()
        print(st.render())
        return 0 if st.running and st.coredns_ready else 1
    if args.cmd == "up":
        printer = Printer()
        try:
            path = cluster.up(printer, nodes=args.nodes)
        finally:
            printer.done()
        print(f"kubeconfig: {path}")
        print("try: tpnb devcluster laptop -- kubectl get nodes", file=sys.stderr)
        return 0
    if args.cmd == "remove-node":
        printer = Printer()
        try:
            cluster.remove_node(args.name, printer)
        finally:
            printer.done()
        return 0
    if args.cmd == "down":
        printer = Printer()
        try:
            cluster.down(purge=args.purge, progress=printer)
        finally:
            printer.done()
        return 0
    if args.cmd == "image":
        return _export_image(args.output)
    if args.cmd == "laptop":
        if args.remove:
            cluster.remove_laptop(args.name)
            return 0
        cmd = list(args.argv)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            cmd = [os.environ.get("SHELL") or "/bin/bash"]
        return run_passthrough(cluster.laptop_cmd(args.name, cmd))
    raise ConfigError(f"unknown command {args.cmd!r}", hint="see `tpnb devcluster --help`")


def run_passthrough(argv: list[str]) -> int:
    """Run argv with our stdin/stdout/stderr and return its exit status.

    While it runs we ignore SIGINT/SIGQUIT: the terminal delivers them to the
    child too, which decides what to do (an interactive shell survives ^C).
    """
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(argv, restore_signals=True,
                                preexec_fn=_default_signals)
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGQUIT, old_quit)
    return 128 - rc if rc < 0 else rc


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
