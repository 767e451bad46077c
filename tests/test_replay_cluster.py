"""`tpnb.replay(record, to="cluster")` against the dev cluster: notebooks/replay.ipynb in the laptop.

The notebook intercepts the cluster's `hello` (the seed's echoserver) with an app in the kernel, curls it
through the intercept, then replays that request: to the kernel (the notebook's answer) and to the cluster
(the echoserver's own answer, which echoes the replayed path, query and header: the intercept was bypassed);
a record naming a workload this session does not hold is refused.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_notebook as rn  # noqa: E402

ARTIFACTS = rn.REPO / "test-artifacts"


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_replay_to_kernel_and_to_the_clusters_real_app() -> None:
    try:
        rn.dev_cluster()
        rn.ensure_hello()
    except Exception as exc:  # noqa: BLE001 - fail with the reason, never skip
        pytest.fail(f"dev cluster not usable: {exc}")
    ARTIFACTS.mkdir(exist_ok=True)
    dst = ARTIFACTS / "replay.out.ipynb"
    try:
        argv = rn.laptop_argv([sys.executable, str(Path(rn.__file__)), str(rn.REPO / "notebooks" / "replay.ipynb"),
                               str(dst), "--timeout", "300"])
        res = subprocess.run(argv, capture_output=True, text=True, timeout=800, cwd=rn.REPO)
    finally:
        rn.stop_laptop_daemon()
    assert dst.exists(), f"nothing executed:\n{res.stdout}\n{res.stderr}"
    nb = nbformat.read(dst, as_version=4)
    problems = rn.errors_of(nb)
    assert res.returncode == 0, "\n".join(["cell problems (see test-artifacts/replay.out.ipynb):", *problems,
                                           res.stderr[-1500:]])
    assert "hello from the notebook (replay demo)" in rn.text_of(rn.tagged(nb, "curl")), problems
    kernel = rn.text_of(rn.tagged(nb, "replay-kernel"))
    assert "GET /orders id=7 200 intercept: hello" in kernel, kernel
    assert "kernel: 200 hello from the notebook (replay demo)" in kernel, kernel
    cluster = rn.text_of(rn.tagged(nb, "replay-cluster"))
    assert "cluster: 200 http://" in cluster and "CLIENT VALUES" in cluster, cluster
    assert "/orders?id=7" in cluster and "x-debug=replay-me" in cluster.lower(), cluster
    assert "hello from the notebook" not in cluster, cluster  # the real app answered, not the intercept
    refused = rn.text_of(rn.tagged(nb, "not-mine"))
    assert "refused: no intercept named 'greeter'" in refused, refused
    assert not any("Traceback" in p for p in problems), problems
