"""The panel's pictures and request tools without a cluster: live charts fed by the in-kernel servers'
push, request details and Replay, the environment filter, personal-intercept filter fields.

A real in-kernel server (uvicorn on loopback) serves real requests; the Session is the magics tests'
FakeSession (no connector), with `replay` bound to the real `api.Session.replay` so the use-case
layer's dispatch runs.  The dev-cluster path of "replay to the cluster" is tests/test_inkernel_cluster.py.
"""
from __future__ import annotations

import math
import socket
import time
from typing import Any

import pytest
import requests

from tpnb import inkernel, widgets
from tpnb.api import Session

pytestmark = pytest.mark.unit

from test_magics_unit import FakeSession, _wait, fake  # noqa: E402,F401 - the fixture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_traffic_buckets_rates_percentiles_and_classes() -> None:
    t = widgets.Traffic(window=10)
    now = 1000.5
    for i in range(100):
        t.add(999.2, 200, float(i + 1))  # one second with 100 requests, 1..100 ms
    t.add(999.3, 404, 5.0)
    t.add(999.4, 503, 7.0)
    t.add(1000.1, 302, 2.0)
    s = t.series(now)
    assert s["x"][-1] == 0.0 and s["x"][0] == -9.0 and len(s["x"]) == 10
    assert s["2xx"][-2] == 100 and s["4xx"][-2] == 1 and s["5xx"][-2] == 1 and s["3xx"][-1] == 1
    assert s["p50"][-2] == 50.0 and s["p99"][-2] == 99.0  # sorted 102 values (1..100, 5, 7): [51] and [100]
    assert math.isnan(s["p50"][0])
    assert t.summary(now) == "last 10 s: 103 requests, 102 req/s, p50 2.0 ms, p99 2.0 ms"  # rate: last full second
    assert t.active(now) and not t.active(now + 11)
    t.add(2000.0, 200, 1.0)  # a new second drops buckets older than the window
    assert set(t.buckets) == {2000}


@pytest.fixture()
def served(fake) -> Any:  # noqa: F811
    port = free_port()

    def app(environ: dict, start_response: Any) -> list[bytes]:
        status = "404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK"
        body = environ["wsgi.input"].read()
        start_response(status, [("Content-Type", "text/plain"), ("X-App", "kernel")])
        return [b"kernel says " + environ["PATH_INFO"].encode() + b" " + body]

    inkernel.serve(app, port, name="hello")
    yield fake, port
    inkernel.stop(port, grace=0)


def test_chart_moves_by_push_and_stops_when_idle(served, monkeypatch) -> None:
    fake, port = served
    monkeypatch.setattr(widgets, "WINDOW", 3)
    p = widgets.Panel(poll_interval=3600)
    try:
        assert p.traffic_select.value == port
        def total() -> float:
            return sum(sum(p.charts.last.get(c, [])) for c in widgets._CLASS_COLORS)

        for i in range(20):
            requests.get(f"http://127.0.0.1:{port}/n{i}")
        requests.get(f"http://127.0.0.1:{port}/missing")
        assert _wait(lambda: p.record_pushes == 21 and total() == 21)
        assert sum(p.charts.last["2xx"]) == 20 and sum(p.charts.last["4xx"]) == 1
        assert max(p.charts.areas.y[0]) >= 1  # the drawn top band: all classes stacked
        assert "21 requests" in p.charts.text.value and max(v for v in p.charts.lines.y[1] if v == v) > 0
        # with no new request the window moves on (once a second) until it is empty, then nothing runs
        assert _wait(lambda: total() == 0, timeout=8)
        time.sleep(1.2)
        draws = p.charts.draws
        time.sleep(2.5)
        assert p.charts.draws == draws  # idle: no polling redraws
        requests.get(f"http://127.0.0.1:{port}/again")
        assert _wait(lambda: p.charts.draws > draws and total() == 1)
    finally:
        p.close()


def test_request_details_and_replay_to_kernel_and_cluster(served) -> None:
    fake, port = served
    other = free_port()  # stands in for the cluster's real app behind the connector's forward
    inkernel.serve(lambda e, sr: (sr("200 OK", [("X-App", "cluster")]), [b"the cluster's app"])[1], other)
    asked = []
    fake.replay = lambda rec, to="cluster", timeout=30.0: Session.replay(fake, rec, to, timeout)  # the real layer
    fake.app_address = lambda name: (asked.append(name), ("127.0.0.1", other, "http://10.42.0.9:8080"))[1]
    p = widgets.Panel(poll_interval=3600)
    try:
        r = requests.post(f"http://127.0.0.1:{port}/orders?id=7", data=b'{"qty": 2}',
                          headers={"X-Trace": "abc", "Content-Type": "application/json"})
        assert r.status_code == 200
        assert _wait(lambda: any("/orders" in label for label, _v in p.req_select.options))
        label, value = next(o for o in p.req_select.options if "/orders" in o[0])
        assert "POST" in label and "200" in label
        p.req_select.value = value  # the user picks it
        d = p.detail_html.value
        assert "POST /orders?id=7" in d and "x-trace" in d and "abc" in d and "{&quot;qty&quot;: 2}" in d
        assert "kernel says /orders" in d and "x-app" in d
        assert not p.replay_kernel_btn.disabled and not p.replay_cluster_btn.disabled
        t = p.replay("kernel")
        t.join(10)
        assert "200 OK" in p.replay_html.value and "kernel says /orders {&quot;qty&quot;: 2}" in p.replay_html.value
        t = p.replay("cluster")
        t.join(10)
        assert asked == ["hello"] and "the cluster&#x27;s app" in p.replay_html.value
        assert "http://10.42.0.9:8080/orders?id=7" in p.replay_html.value
        # the open request stays listed while newer ones arrive
        for i in range(widgets.LOG_ROWS + 3):
            requests.get(f"http://127.0.0.1:{port}/later{i}")
        assert _wait(lambda: any("/later" in label for label, _v in p.req_select.options))
        time.sleep(0.5)
        assert p.req_select.value == value and "POST /orders" in p.detail_html.value
    finally:
        p.close()
        inkernel.stop(other, grace=0)


def test_replay_to_cluster_needs_an_intercept(served) -> None:
    fake, port = served
    bare = free_port()
    inkernel.serve(lambda e, sr: (sr("200 OK", []), [b"x"])[1], bare)  # served, but no intercept routes here
    try:
        requests.get(f"http://127.0.0.1:{bare}/x")
        rec = inkernel.requests_log(bare)[-1]
        from tpnb.errors import ConfigError

        with pytest.raises(ConfigError) as ei:
            Session.replay(fake, rec, "cluster")
        assert "no intercept" in str(ei.value) and 'to="kernel"' in str(ei.value)
    finally:
        inkernel.stop(bare, grace=0)


def test_env_view_filters_and_collapses(fake) -> None:  # noqa: F811
    fake.intercepts["hello"] = fake.intercept("hello", 9000)
    p = widgets.Panel(start=False)
    try:
        assert "KUBERNETES_SERVICE_HOST" in p.env_html.value
        n = len(fake.intercepts["hello"].environment)
        assert f"({n} variables)" in p.env_box.get_title(0)
        p.env_filter.value = "kubernetes_service"
        shown = p.env_html.value
        assert "KUBERNETES_SERVICE_HOST" in shown and all(k in shown or "KUBERNETES_SERVICE" not in k.upper()
                                                          for k in fake.intercepts["hello"].environment)
        assert " of " in p.env_box.get_title(0)
        p.env_filter.value = "no-such-thing"
        assert "no variable matches" in p.env_html.value
        p.env_box.selected_index = None  # collapsed by the user
        p.refresh()
        assert p.env_box.selected_index is None
    finally:
        p.close()


def test_intercept_form_container_field_is_the_clis_container_option(fake) -> None:  # noqa: F811
    """The panel's Container field reaches Session.intercept as `container`, exactly as
    `tpnb intercept hello --container sidecar` does (the CLI's parser and mapping)."""
    from tpnb import cli

    seen: list[dict] = []
    real = fake.intercept

    def intercept(name: str, port: int, **kw: Any) -> Any:
        seen.append(kw)
        return real(name, port, **kw)

    fake.intercept = intercept
    p = widgets.Panel(start=False)
    try:
        assert p.f_container.value == "" and "tpnb-intercept-container" in p.f_container._dom_classes
        p.f_container.value = "  sidecar "
        p.f_header.value = "x-dev=alice"
        p.intercept("hello", 9123).join(5)
        assert seen and seen[-1]["container"] == "sidecar", p.message.value
        args = cli.build_parser().parse_args(["intercept", "hello", "--port", "9123", "--container", "sidecar",
                                              "--http-header", "x-dev=alice"])
        assert {k: seen[-1][k] for k in cli.intercept_kwargs(args)} == cli.intercept_kwargs(args)
    finally:
        p.close()


def test_intercept_form_passes_personal_filters_to_the_api(fake) -> None:  # noqa: F811
    seen: list[dict] = []
    real = fake.intercept

    def intercept(name: str, port: int, **kw: Any) -> Any:
        seen.append(kw)
        return real(name, port, **kw)

    fake.intercept = intercept
    p = widgets.Panel(start=False)
    try:
        p.f_header.value = "x-dev=alice, auto"
        p.f_path_kind.value = "prefix"
        p.f_path.value = "/api"
        p.intercept("hello", 9123).join(5)
        assert seen[-1]["http_headers"] == [("x-dev", "alice"), ("", "")]
        assert seen[-1]["http_path_prefix"] == "/api"
        assert seen[-1]["container"] == ""   # no container named: the only one, or the Service's port's
        p.leave("hello").join(5)
        p.f_header.value = "no-equals-sign"
        p.intercept("hello", 9123).join(5)
        assert "expected NAME=VALUE or auto" in p.message.value and len(seen) == 1  # the CLI's own check
        p.f_header.value = ""
        p.f_path.value = ""
        p.intercept("hello", 9123).join(5)
        assert "path prefix filter is empty" in p.message.value and len(seen) == 1
    finally:
        p.close()
