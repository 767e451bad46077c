"""Workload shapes (issue 12), the pure planning: which Service port, container and
Services an intercept takes, what is refused and why, and when the Service routes
to the agent.  The same shapes run against the dev cluster in test_workload_shapes.py.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tpnb import config
from tpnb.connector import agent_injector as inj
from tpnb.connector.intercepts import endpoints_on_agent
from tpnb.errors import InterceptError

pytestmark = pytest.mark.unit


def _wl(containers: list[dict[str, Any]], kind: str = "StatefulSet", **spec: Any) -> inj.Workload:
    obj = {"apiVersion": "apps/v1", "kind": kind,
           "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "1"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": containers, **spec}}}}
    return inj.Workload(kind, "web", "ns", obj)


def _svc(name: str, ports: list[dict[str, Any]], selector: dict[str, str] | None = None,
         **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns", "resourceVersion": "2"},
            "spec": {"selector": {"app": "web"} if selector is None else selector, "ports": ports,
                     "clusterIP": "10.43.0.9", **spec}}


APP = {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 8080},
                                               {"name": "metrics", "containerPort": 9090}]}
SIDECAR = {"name": "sidecar", "image": "y", "ports": [{"name": "admin", "containerPort": 7000}]}
MULTI = _svc("web", [{"name": "http", "port": 80, "targetPort": "http"},
                     {"name": "metrics", "port": 9090, "targetPort": 9090}])


def test_multi_port_service_intercepts_one_port_and_leaves_the_others() -> None:
    cfg = config.Config()
    wl = _wl([APP])
    t = inj.resolve_target(wl, [MULTI], None, "http")
    assert (t.port_name, t.container, t.container_port) == ("http", "app", 8080)
    new = inj.inject_workload(wl.obj, wl, t, "img", cfg)
    app, agent = new["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in app["ports"]] == ["tpnb-orig-http", "metrics"]   # metrics still the app's
    assert agent["ports"] == [{"name": "http", "containerPort": 9900, "protocol": "TCP"}]
    assert inj.inject_service(MULTI, t, cfg) == MULTI   # named: the Service is left alone
    # the numeric port intercepted instead: only that port of the Service moves
    t2 = inj.resolve_target(wl, [MULTI], None, "9090")
    svc2 = inj.inject_service(MULTI, t2, cfg)
    assert [p["targetPort"] for p in svc2["spec"]["ports"]] == ["http", 9900]
    assert json.loads(svc2["metadata"]["annotations"][inj.ANN_SVC_ORIG]) == {"metrics": 9090}
    assert inj.restore_service(svc2) == MULTI


def test_endpoints_on_agent_looks_at_the_intercepted_port_only() -> None:
    def sl(ports: dict[str, int], ready: list[bool | None]) -> dict[str, Any]:
        return {"ports": [{"name": n, "port": p} for n, p in ports.items()],
                "endpoints": [{"conditions": {} if r is None else {"ready": r}} for r in ready]}

    # the Service's other port is the app's: still "on the agent" (this used to wait forever)
    assert endpoints_on_agent([sl({"http": 9900, "metrics": 9090}, [True, True])], "http", 9900) == (2, 0, [9900])
    # an old pod still ready on the app's port: not yet
    assert endpoints_on_agent([sl({"http": 9900}, [True]), sl({"http": 8080}, [True])], "http", 9900) == \
        (1, 1, [8080, 9900])
    # terminating / not-ready endpoints do not count; a single unnamed port has name "" (or None)
    assert endpoints_on_agent([sl({"http": 8080}, [False]), sl({"http": 9900}, [None])], "http", 9900)[:2] == (1, 0)
    assert endpoints_on_agent([{"ports": [{"name": None, "port": 9900}], "endpoints": [{}]}], "", 9900)[:2] == (1, 0)
    assert endpoints_on_agent([], "http", 9900) == (0, 0, [])


def test_container_choice_and_clear_errors() -> None:
    wl = _wl([APP, SIDECAR])
    svc = _svc("web", [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "admin", "port": 7000}])
    # the Service ports name the containers that serve them
    assert inj.resolve_target(wl, [svc], None, "80").container == "app"
    t = inj.resolve_target(wl, [svc], None, None, "sidecar")
    assert (t.container, t.container_port, t.port_name) == ("sidecar", 7000, "admin")
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [svc], None, None, "nope")
    assert "no container 'nope'" in ei.value.what and "app, sidecar" in ei.value.why
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [svc], None, "80", "sidecar")
    assert "container app's, not sidecar's" in ei.value.why
    # an undeclared port in a pod of two containers: ambiguous, and the error lists them
    svc3 = _svc("web", [{"port": 80, "targetPort": 5000}])
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [svc3], None, None)
    assert "several: app, sidecar" in ei.value.why and "--container" in ei.value.why + ei.value.hint
    t = inj.resolve_target(wl, [svc3], None, None, "sidecar")
    assert (t.container, t.container_port) == ("sidecar", 5000)
    # the agent takes the chosen container's env and volumes
    agent = inj.inject_workload(wl.obj, wl, t, "img", config.Config())["spec"]["template"]["spec"]["containers"][-1]
    assert {"name": "TPNB_CONTAINER", "value": "sidecar"} in agent["env"]
    assert {"name": "APP_PORT", "value": "5000"} in agent["env"]


def test_several_services_are_one_intercept_of_the_container_port() -> None:
    cfg = config.Config()
    wl = _wl([APP])
    a = _svc("web", [{"name": "http", "port": 80, "targetPort": 8080}])
    b = _svc("web-internal", [{"port": 8080}])                       # no targetPort: the port itself
    c = _svc("web-metrics", [{"port": 9090, "targetPort": "metrics"}])
    hl = _svc("web-hl", [{"port": 8080}], clusterIP="None")
    other = _svc("other", [{"port": 8080}], selector={"app": "other"})
    t = inj.resolve_target(wl, [b, a, c, hl, other], None, "8080")
    assert t.service == "web" and t.container_port == 8080       # first by name, not ambiguous
    assert inj.resolve_target(wl, [b, a, c, hl], "web-internal", None).service == "web-internal"
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [a, c], None, None)
    assert "several Service ports" in ei.value.what
    plans = {s["metadata"]["name"]: w for s, w in inj.plan_services([a, b, c, hl, other], {"app": "web"}, t, cfg)}
    assert sorted(plans) == ["web", "web-internal"]     # metrics, headless and the other app's stay
    assert plans["web-internal"]["spec"]["ports"][0]["targetPort"] == 9900
    assert json.loads(plans["web-internal"]["metadata"]["annotations"][inj.ANN_SVC_ORIG]) == {"8080": None}
    assert inj.restore_service(plans["web-internal"]) == b
    # planned again on the routed Services: nothing more to do
    assert inj.plan_services(list(plans.values()), {"app": "web"}, t, cfg) == []
    # a Service routed earlier that no longer selects the pods is restored
    moved = copy.deepcopy(plans["web-internal"])
    moved["spec"]["selector"] = {"app": "elsewhere"}
    (cur, want), = inj.plan_services([moved], {"app": "web"}, t, cfg)
    assert want["spec"]["ports"][0].get("targetPort") is None and inj.ANN_SVC_ORIG not in (
        want["metadata"].get("annotations") or {})


def test_unsupported_shapes_are_refused_naming_why() -> None:
    svc = _svc("web", [{"port": 80, "targetPort": 8080}])
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(_wl([APP], hostNetwork=True), [svc], None, None)
    assert "hostNetwork" in ei.value.what and "node" in ei.value.why
    scaled = _wl([APP])
    scaled.obj["spec"]["replicas"] = 0
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(scaled, [svc], None, None)
    assert "scaled to 0" in ei.value.what and "--replicas=1" in ei.value.hint
    manual = _svc("web-manual", [{"port": 80, "targetPort": 8080}], selector={})
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(_wl([APP]), [svc, manual], "web-manual", None)
    assert "has no selector" in ei.value.what and "endpoints" in ei.value.why
    ext = _svc("web-ext", [{"port": 80}], selector={}, type="ExternalName", externalName="example.org")
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(_wl([APP]), [ext], "web-ext", None)
    assert "ExternalName" in ei.value.what


def test_headless_service_gets_the_pod_side_redirect() -> None:
    cfg = config.Config()
    wl = _wl([APP])
    hl = _svc("web-hl", [{"name": "http", "port": 8080}], clusterIP="None")
    svc = _svc("web", [{"port": 80, "targetPort": "http"}])
    for service in (None, "web-hl"):   # the only Service, or named
        t = inj.resolve_target(wl, [hl], service, None)
        assert (t.service, t.headless, t.container_port) == ("web-hl", True, 8080)
    # beside a Service with a cluster IP, that one is reported (and waited for); the redirect comes anyway
    t = inj.resolve_target(wl, [hl, svc], None, None)
    assert (t.service, t.headless) == ("web", False)
    assert inj.needs_redirect(wl, [hl, svc], t) and not inj.needs_redirect(wl, [svc], t)
    assert not inj.needs_redirect(wl, [hl], inj.resolve_target(wl, [hl, MULTI], None, "9090"))  # other port
    new = inj.inject_workload(wl.obj, wl, t, "img", cfg, redirect=True)
    pod = new["spec"]["template"]["spec"]
    init, = pod["initContainers"]
    assert init["name"] == inj.INIT_CONTAINER and init["command"] == ["python3", "-m", "tpnb.cluster.redirect"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert {"name": "APP_PORT", "value": "8080"} in init["env"] and {"name": "AGENT_PORT", "value": "9900"} in init["env"]
    assert "NET_ADMIN" not in json.dumps(pod["containers"])          # the agent itself never holds it
    assert inj.restore_workload(new) == wl.obj
    plain = inj.inject_workload(wl.obj, wl, t, "img", cfg)
    assert "initContainers" not in plain["spec"]["template"]["spec"]
    assert json.loads(plain["metadata"]["annotations"][inj.ANN_INJECTED])["hash"] != \
        json.loads(new["metadata"]["annotations"][inj.ANN_INJECTED])["hash"]
    # a pod without the redirect is not of the template with it (so the rollout replaces it)
    assert not inj.pod_matches_template({"spec": plain["spec"]["template"]["spec"]}, pod)
    assert inj.pod_matches_template({"spec": copy.deepcopy(pod)}, pod)
    # the app's own init containers stay, in order
    wl2 = _wl([APP], initContainers=[{"name": "migrate", "image": "m"}])
    new2 = inj.inject_workload(wl2.obj, wl2, t, "img", cfg, redirect=True)
    assert [c["name"] for c in new2["spec"]["template"]["spec"]["initContainers"]] == ["migrate", inj.INIT_CONTAINER]
    assert inj.restore_workload(new2) == wl2.obj


def test_redirect_rules() -> None:
    from tpnb.cluster import redirect

    table = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
             "eth0\t00000000\t01002A0A\t0003\t0\t0\t0\t00000000\n"
             "eth0\t00002A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n")
    assert redirect.default_gateway(table) == "10.42.0.1"
    assert redirect.default_gateway(table.splitlines()[0]) is None
    rules = redirect.ruleset(8080, 9900, "10.42.0.1")
    assert "ip saddr != 10.42.0.1 tcp dport 8080 redirect to :9900" in rules
    assert rules.startswith("table ip tpnb_agent\ndelete table ip tpnb_agent\n")   # a rerun replaces it
    assert "ip saddr" not in redirect.ruleset(8080, 9900, None)
