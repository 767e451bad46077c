"""Execute a notebook with nbclient and save the result; plus helpers shared by the notebook tests.

As a script (run it inside the dev cluster's laptop, so the kernel is "on the laptop"):

    python tests/run_notebook.py notebooks/quickstart.ipynb OUT.ipynb [--timeout 300]

exits 0 when every cell ran, 1 when one raised (the partial notebook is saved
either way, so the failing cell's output can be read).  The kernel is the
running Python's own (`python3` resolves to sys.executable through
ipykernel's native kernel spec), so the venv's tpnb is what gets tested.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: the dev-cluster laptop these tests run in: their own, so their daemon never collides with another suite's
LAPTOP = os.environ.get("TPNB_TEST_LAPTOP", "notebook")
ECHO_IMAGE = "tpnb.local/echoserver:1.4"


# ------------------------------------------------------------------ running a notebook
def execute(src: Path, dst: Path, timeout: int = 300) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(src.parent)}})
    code = 0
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"a cell failed:\n{exc}", file=sys.stderr)
        code = 1
    finally:
        nbformat.write(nb, dst)
    return code


def tagged(nb: Any, tag: str) -> Any:
    for cell in nb.cells:
        if tag in cell.get("metadata", {}).get("tags", []):
            return cell
    raise KeyError(f"no cell tagged {tag!r}")


def text_of(cell: Any, streams: tuple[str, ...] = ("stdout",)) -> str:
    """All text a code cell showed: stream output plus text/plain results."""
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") in streams:
            out.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "application/vnd.jupyter.widget-view+json" not in data:
                out.append(data.get("text/plain", ""))
        elif o.get("output_type") == "error" and "stderr" in streams:
            out.append("\n".join(o.get("traceback", [])))
    return "".join(out)


def errors_of(nb: Any) -> list[str]:
    """stderr text and error outputs of every cell, labeled by tag, to explain a failure."""
    out = []
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        tag = ",".join(cell.get("metadata", {}).get("tags", [])) or cell.get("source", "")[:30]
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"[{tag}] {o.get('ename')}: {o.get('evalue')}")
            elif o.get("output_type") == "stream" and o.get("name") == "stderr":
                out.append(f"[{tag}] {o.get('text', '').strip()}")
    return out


# ------------------------------------------------------------------ the dev cluster
def dev_cluster() -> Any:
    """The dev cluster's Python API, or a clear failure when it is not up."""
    kubeconfig = Path("/var/lib/tpnb/devcluster/kubeconfig")
    if not kubeconfig.exists():
        raise RuntimeError(f"the dev cluster is not set up: {kubeconfig} is missing "
                           "(run `tpnb devcluster up` as root)")
    from tpnb_devcluster.cluster import DevCluster

    dc = DevCluster()
    st = dc.status()
    if not (st.running and st.coredns_ready):
        raise RuntimeError("the dev cluster is not ready:\n" + st.render())
    return dc


def in_laptop() -> bool:
    return bool(os.environ.get("TPNB_LAPTOP"))


def laptop_argv(argv: list[str]) -> list[str]:
    """argv run inside the dev cluster's laptop netns (unchanged if we already are inside one)."""
    if in_laptop():
        return argv
    return dev_cluster().laptop_cmd(LAPTOP, argv)


def ensure_hello() -> None:
    """The seed's `hello` deployment + service in `default` (created if missing, kept afterwards)."""
    dc = dev_cluster()
    if dc.kubectl("get", "deploy", "hello", "-n", "default", check=False).returncode != 0:
        dc.kubectl("create", "deploy", "hello", f"--image={ECHO_IMAGE}", "-n", "default")
    if dc.kubectl("get", "svc", "hello", "-n", "default", check=False).returncode != 0:
        dc.kubectl("expose", "deploy", "hello", "--port", "80", "--target-port", "8080", "-n", "default")
    dc.kubectl("rollout", "status", "deploy/hello", "-n", "default", "--timeout=120s", timeout=150)


def ensure_greeter() -> None:
    """A gRPC workload: deployment + service `greeter` (port 50051) in `default`, a grpcio server in the
    project's image (notebooks/grpc_calls.py --serve) answering "hello NAME from the cluster"."""
    import json

    from tpnb.imageref import default_image

    dc = dev_cluster()
    script = (REPO / "notebooks" / "grpc_calls.py").read_text()
    labels = {"app": "greeter"}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "greeter", "namespace": "default"},
              "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                  "metadata": {"labels": labels}, "spec": {"containers": [{
                      "name": "greeter", "image": default_image(), "imagePullPolicy": "IfNotPresent",
                      "command": ["python3", "-u", "-c", script, "--serve", "50051"],
                      "ports": [{"containerPort": 50051}]}]}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "greeter", "namespace": "default"},
           "spec": {"selector": labels, "ports": [{"name": "grpc", "port": 50051, "targetPort": 50051}]}}
    if dc.kubectl("get", "deploy", "greeter", "-n", "default", check=False).returncode != 0:
        dc.kubectl("apply", "-f", "-", input=json.dumps(deploy))
    if dc.kubectl("get", "svc", "greeter", "-n", "default", check=False).returncode != 0:
        dc.kubectl("apply", "-f", "-", input=json.dumps(svc))
    dc.kubectl("rollout", "status", "deploy/greeter", "-n", "default", "--timeout=180s", timeout=200)


def stop_laptop_daemon() -> None:
    """Best effort: end the laptop's session and daemon so the next test starts clean."""
    subprocess.run(laptop_argv([str(Path(sys.executable).parent / "tpnb"), "quit", "--daemon"]),
                   capture_output=True, timeout=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = ap.parse_args(argv)
    return execute(args.src, args.dst, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
