"""The CLI and the %tp magics are two faces of one API: same words for the same operations.

Both run inside one laptop against the dev cluster; the magic runs in a real
IPython shell, the CLI as a process, and their outputs are compared.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS = "tpfaces"

MAGIC = r"""
import contextlib, io, json, sys
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "tpnb")
out = {}
for line in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            ip.run_line_magic("tp", line)
        except Exception as exc:  # a failing %tp raises (Run All stops); IPython shows these lines
            render = getattr(exc, "_render_traceback_", None)
            if render is None:
                raise
            print("\n".join(render()), file=sys.stderr)
    out[line] = [o.getvalue(), e.getvalue()]
print("RESULT " + json.dumps(out))
"""

OPS = [
    "version",
    "status",
    f"list --namespace {NS}",
    f"intercept nosuch --namespace {NS} --port 9000 -- true",
    f"intercept hello --namespace {NS} --port 9555",
    "leave nosuch",
    "intercept hello --port nine",
    "uninstall",
]


@pytest.fixture(scope="module")
def lap(devcluster: Any) -> Iterator[LaptopRunner]:
    lap = LaptopRunner(devcluster, "faces")
    lap.fresh_namespace(NS)
    lap.kubectl("-n", NS, "create", "deploy", "hello", "--image=tpnb.local/echoserver:1.4")
    lap.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    lap.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    yield lap
    lap.drop_namespace(NS)


def _normalise(text: str) -> str:
    # argparse names the program: "tpnb" for the CLI, "%tp" for the magic
    return re.sub(r"(usage: |^)(%tp|tpnb)\b", r"\1PROG", text.strip(), flags=re.M)


def test_cli_and_magics_say_the_same(lap: LaptopRunner) -> None:
    import sys

    r = lap.run([sys.executable, "-c", MAGIC, json.dumps(OPS)], timeout=300)
    magic = json.loads(r.stdout.split("RESULT ", 1)[1])
    for op in OPS:
        cli = lap.run(["tpnb", *op.split()], check=False, timeout=120)
        m_out, m_err = magic[op]
        assert _normalise(cli.stdout) == _normalise(m_out), op
        assert _normalise(cli.stderr) == _normalise(m_err), op
        assert "Traceback" not in m_err and "Traceback" not in cli.stderr, op
    # and they are the words a user needs
    assert "nothing listens on 127.0.0.1:9555" in magic[OPS[4]][1]
    assert "fix:" in magic[OPS[4]][1]
    assert "hello" in magic[OPS[2]][0]
