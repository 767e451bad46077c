"""The daemon's view of one Kubernetes cluster, built from the *user's* kubeconfig.

The root daemon acts with the user's credentials (it installs the
traffic-manager and injects agents as the user), so everything here starts
from the kubeconfig the client passed in, never from in-cluster config.

Two transports share one `KubeTarget`:

* the blocking `kubernetes` client (`KubeTarget.api`) for ordinary REST calls;
  callers run it in a worker thread (`anyio.to_thread.run_sync`, see `request`)
  so the daemon's event loop never blocks on the network;
* raw asyncio connections (`check_reachable`, the port-forward WebSockets)
  that use `KubeTarget.ssl_context` and `KubeTarget.headers` directly, so that
  a reachability check exercises exactly the TLS setup the tunnel will use.

Every failure becomes a `ClusterError` (or `PermissionDenied`) with a what /
why / fix; no caller ever has to print a traceback.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import anyio
import urllib3
import yaml
from kubernetes.client import ApiClient, ApiException, Configuration

from tpnb import config
from tpnb.errors import ClusterError, PermissionDenied, TpnbError

log = logging.getLogger(__name__)

__all__ = [
    "KubeTarget",
    "api_error",
    "check_reachable",
    "cluster_subnets",
    "connect_error",
    "load_in_cluster_target",
    "load_target",
    "rbac_error",
    "request",
    "status_message",
    "watch_events",
]


# --------------------------------------------------------------------- target
@dataclass
class KubeTarget:
    """One cluster as seen through one kubeconfig context."""

    context: str
    server: str
    #: the context's default namespace, or "default"
    namespace: str
    #: CA + client certificate/key from the kubeconfig (HTTP/1.1 only, for WebSockets)
    ssl_context: ssl.SSLContext
    #: ``Authorization`` when a token, token file or exec plugin is used
    headers: dict[str, str]
    #: configured blocking client; use from a worker thread only
    api: ApiClient
    #: kubeconfig ``tls-server-name`` (SNI / hostname to verify), if set
    tls_server_name: str | None = None
    #: kubeconfig ``proxy-url``, if set
    proxy: str | None = None
    #: the kubeconfig file(s) this came from, for messages
    kubeconfig: str = ""
    _configuration: Configuration | None = field(default=None, repr=False)

    def auth_headers(self) -> dict[str, str]:
        """Current auth headers; re-runs an exec plugin / re-reads a token file
        through the kubernetes client's refresh hook when the credential
        expired, because a daemon outlives short-lived tokens."""
        cfg = self._configuration
        if cfg is not None and ("BearerToken" in cfg.api_key or cfg.refresh_api_key_hook):
            try:
                value = cfg.get_api_key_with_prefix("BearerToken")
            except Exception as exc:  # noqa: BLE001 - a failing exec plugin on refresh
                raise ClusterError(
                    f"cannot refresh the credentials of kube context {self.context!r}",
                    str(exc),
                    "check the credential plugin / token in your kubeconfig",
                ) from None
            if value:
                self.headers["Authorization"] = value
        return dict(self.headers)

    @property
    def secure(self) -> bool:
        return urlsplit(self.server).scheme == "https"

    def url(self, path: str, query: dict[str, Any] | None = None, websocket: bool = False) -> str:
        """Absolute URL for an API path; keeps a server path prefix (proxies such
        as Rancher serve the API under /k8s/clusters/<id>)."""
        u = urlsplit(self.server)
        scheme = u.scheme
        if websocket:
            scheme = "wss" if scheme == "https" else "ws"
        out = f"{scheme}://{u.netloc}{u.path.rstrip('/')}{path}"
        if query:
            out += "?" + urlencode(query, doseq=True)
        return out


def _private_tmpdir() -> str:
    """One 0700 directory per process for certificate data written out of the
    kubeconfig (*-data fields): urllib3 can only load client certs from files.
    Removed at exit; kept while running because urllib3 re-reads the files for
    every new connection."""
    global _TMPDIR
    if _TMPDIR is None:
        _TMPDIR = tempfile.mkdtemp(prefix="tpnb-kube-")
        atexit.register(shutil.rmtree, _TMPDIR, True)
    return _TMPDIR


_TMPDIR: str | None = None


def _kubeconfig_paths(kubeconfig: str | None) -> list[str]:
    if kubeconfig:
        raw = kubeconfig
    elif os.environ.get("KUBECONFIG"):
        raw = os.environ["KUBECONFIG"]
    else:
        raw = str(config._home() / ".kube" / "config")
    return [os.path.expanduser(p) for p in raw.split(os.pathsep) if p]


def _bad_kubeconfig(what: str, why: str = "") -> ClusterError:
    return ClusterError(
        what,
        why,
        "fix or regenerate the kubeconfig (see `kubectl config view`); "
        "for the built-in dev cluster run `tpnb devcluster up`",
    )


def load_target(kubeconfig: str | None = None, context: str | None = None) -> KubeTarget:
    """Build a `KubeTarget` from a kubeconfig (a path or a ':'-joined list, as
    KUBECONFIG) and an optional context name.

    Merging follows kubectl: the first file that defines a name (or
    ``current-context``) wins; missing files in a list are skipped.  Parsing,
    credential loading (token, tokenFile, exec plugins, client certs, inline
    *-data written to private temp files) is delegated to the kubernetes
    client's loader, but every check a user can get wrong is done here first so
    the error names the file and the context.
    """
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger

    paths = _kubeconfig_paths(kubeconfig)
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
        raise _bad_kubeconfig(
            "no kubeconfig found",
            "looked for: " + ", ".join(paths or ["(nothing)"]),
        )
    docs: list[tuple[str, dict[str, Any]]] = []
    for p in existing:
        try:
            with open(p, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError) as exc:
            raise _bad_kubeconfig(f"cannot read kubeconfig {p}", str(exc)) from None
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _bad_kubeconfig(f"cannot parse kubeconfig {p}", first) from None
        if doc is None:
            continue  # an empty file in a KUBECONFIG list is legal
        if not isinstance(doc, dict):
            raise _bad_kubeconfig(f"cannot parse kubeconfig {p}", "the file is not a YAML mapping")
        for key in ("clusters", "contexts", "users"):
            items = doc.get(key) or []
            if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
                raise _bad_kubeconfig(f"cannot parse kubeconfig {p}", f"{key!r} must be a list of named entries")
        docs.append((p, doc))
    if not docs:
        raise _bad_kubeconfig("the kubeconfig is empty", ", ".join(existing))
    origin = ":".join(p for p, _ in docs)

    try:
        merger = KubeConfigMerger(origin)
    except (ConfigException, yaml.YAMLError, OSError) as exc:
        raise _bad_kubeconfig(f"cannot load kubeconfig {origin}", str(exc)) from None
    merged = merger.config
    # kubectl: the first file that sets current-context wins (the library lets the last win)
    current = next((d.get("current-context") for _, d in docs if d.get("current-context")), "")
    merged.value["current-context"] = current

    contexts = {c["name"]: c for c in merged.value.get("contexts", [])}
    name = context or current
    if not name:
        raise ClusterError(
            f"no Kubernetes context selected in {origin}",
            "the kubeconfig has no current-context" + (f"; contexts: {', '.join(contexts)}" if contexts else ""),
            "pass a context explicitly, or run `kubectl config use-context NAME`",
        )
    if name not in contexts:
        raise ClusterError(
            f"kube context {name!r} not found in {origin}",
            f"known contexts: {', '.join(sorted(contexts)) or '(none)'}",
            "pick one of the known contexts (`kubectl config get-contexts`)",
        )
    ctx = contexts[name].value.get("context") or {}
    clusters = {c["name"]: c for c in merged.value.get("clusters", [])}
    cluster_name = ctx.get("cluster")
    if cluster_name not in clusters:
        raise _bad_kubeconfig(
            f"kube context {name!r} refers to cluster {cluster_name!r}, which is not in {origin}",
            f"known clusters: {', '.join(sorted(clusters)) or '(none)'}",
        )
    cluster = clusters[cluster_name].value.get("cluster") or {}
    server = str(cluster.get("server") or "").rstrip("/")
    if urlsplit(server).scheme not in ("http", "https") or not urlsplit(server).hostname:
        raise _bad_kubeconfig(
            f"cluster {cluster_name!r} in {origin} has no usable server URL",
            f"server: {server!r}",
        )
    user_name = ctx.get("user")
    users = {u["name"]: u for u in merged.value.get("users", [])}
    if user_name and user_name not in users:
        raise _bad_kubeconfig(
            f"kube context {name!r} refers to user {user_name!r}, which is not in {origin}",
            f"known users: {', '.join(sorted(users)) or '(none)'}",
        )
    user = (users[user_name].value.get("user") or {}) if user_name else {}

    cfg = Configuration()
    try:
        loader = KubeConfigLoader(
            config_dict=merged,
            active_context=name,
            config_base_path=None,
            temp_file_path=_private_tmpdir(),
        )
        loader.load_and_set(cfg)
    except (ConfigException, ValueError, TypeError, OSError, KeyError) as exc:
        raise _bad_kubeconfig(f"cannot load credentials of kube context {name!r} from {origin}", str(exc)) from None
    if user.get("exec") and "BearerToken" not in cfg.api_key and not cfg.cert_file:
        # the library logs and swallows plugin failures; run it again for the message
        why = "the plugin returned no token or certificate"
        try:
            from kubernetes.config.exec_provider import ExecProvider
            from kubernetes.config.kube_config import ConfigNode

            ExecProvider(ConfigNode("exec", user["exec"]), os.path.dirname(docs[0][0]),
                         ConfigNode("cluster", cluster)).run()
        except Exception as exc:  # noqa: BLE001 - any plugin failure is the user's to see
            why = str(exc)
        raise ClusterError(
            f"the credential plugin of kube context {name!r} failed",
            why,
            f"run `{user['exec'].get('command', 'the plugin')}` yourself to see what it needs (login?)",
        )

    return _target(cfg, name, server, str(ctx.get("namespace") or "default"), origin)


def _target(cfg: Configuration, name: str, server: str, namespace: str, origin: str) -> KubeTarget:
    """The `KubeTarget` of a loaded client configuration (kubeconfig or in-cluster)."""
    cfg.host = server
    # One quick attempt per call: callers bound calls with timeouts.api and
    # report; urllib3's default 3 retries would triple an unreachable timeout.
    cfg.retries = urllib3.Retry(total=1, connect=0, read=0, redirect=2, status=0, other=0)
    cfg.connection_pool_maxsize = 8
    api = ApiClient(configuration=cfg)
    from tpnb.version import __version__

    api.user_agent = f"tpnb/{__version__}"

    headers: dict[str, str] = {}
    if "BearerToken" in cfg.api_key:
        headers["Authorization"] = cfg.get_api_key_with_prefix("BearerToken")

    ssl_ctx = _ssl_context(cfg, name, origin)
    return KubeTarget(
        context=name,
        server=server,
        namespace=namespace,
        ssl_context=ssl_ctx,
        headers=headers,
        api=api,
        tls_server_name=getattr(cfg, "tls_server_name", None) or None,
        proxy=cfg.proxy or None,
        kubeconfig=origin,
        _configuration=cfg,
    )


IN_CLUSTER_CONTEXT = "in-cluster"


def load_in_cluster_target() -> KubeTarget:
    """The pod's own ServiceAccount as a `KubeTarget` (in-cluster mode with no kubeconfig mounted).

    The kubernetes client's in-cluster loader reads the token, CA and API
    server address exactly as client-go does, and re-reads the projected token
    before it expires (the kubelet rotates it), which `auth_headers` picks up
    through the configuration's refresh hook.  The namespace is the pod's own.
    """
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    from tpnb.common import incluster

    sa = incluster.sa_dir()
    cfg = Configuration()
    try:
        InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt")).load_and_set(cfg)
    except ConfigException as exc:
        raise ClusterError(
            "cannot use this pod's ServiceAccount",
            str(exc),
            "run in a pod with a mounted ServiceAccount token (automountServiceAccountToken: true), "
            "mount a kubeconfig and set KUBECONFIG, or connect without --in-cluster",
        ) from None
    server = str(cfg.host).rstrip("/")
    namespace = incluster.pod_namespace() or "default"
    return _target(cfg, IN_CLUSTER_CONTEXT, server, namespace, f"the ServiceAccount at {sa}")


def _ssl_context(cfg: Configuration, context: str, origin: str) -> ssl.SSLContext:
    """TLS for the asyncio transports, equivalent to what urllib3 does for the
    sync client.  ALPN pins HTTP/1.1: a WebSocket upgrade cannot ride HTTP/2."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ssl_ca_cert or None)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _bad_kubeconfig(
            f"bad certificate data for kube context {context!r} in {origin}",
            getattr(exc, "reason", None) or str(exc),
        ) from None
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# ------------------------------------------------------------------ messages
def status_message(body: Any) -> str:
    """The human message of a Kubernetes `Status` body (bytes / str / dict)."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:500]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("reason") or body)[:1000]
    return "" if body is None else str(body)[:500]


def credentials_rejected(what: str, msg: str) -> ClusterError:
    """A 401 from the API server, whatever was being done: the one wording for every caller."""
    return ClusterError(
        f"{what}: the Kubernetes API server rejected your credentials (401 Unauthorized)",
        msg,
        "your token or client certificate is wrong or expired; log in again / refresh the kubeconfig "
        "(`kubectl get ns` should work)",
    )


_RBAC_RE = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>[\w-]+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
    r'(?: in the namespace "(?P<ns>[^"]*)"| at the cluster scope)?'
)


def rbac_error(exc: ApiException, verb: str, resource: str, namespace: str | None) -> PermissionDenied:
    """Turn a 403 into a `PermissionDenied` that says who was refused what.

    The API server's message carries the identity it authenticated ("User
    "alice" cannot create resource ..."); that identity is often the surprise
    (an expired token degrading to system:anonymous, the wrong context), so it
    goes into the first line.
    """
    msg = status_message(getattr(exc, "body", None)) or str(getattr(exc, "reason", "") or "forbidden")
    m = _RBAC_RE.search(msg)
    user = m.group("user") if m else None
    if m:
        verb = m.group("verb") or verb
        res = m.group("resource")
        group = m.group("group")
        resource = f"{res}.{group}" if group else res
        namespace = m.group("ns") if m.group("ns") is not None else (None if "cluster scope" in msg else namespace)
    where = f"in namespace {namespace!r}" if namespace else "cluster-wide"
    who = f"user {user!r}" if user else "your kube user"
    ns_flag = f" -n {namespace}" if namespace else ""
    err = PermissionDenied(
        f"{who} may not {verb} {resource} {where}",
        msg,
        f"ask a cluster admin for RBAC permission to {verb} {resource} {where} "
        f"(check with `kubectl auth can-i {verb} {resource}{ns_flag}`), or use another context",
    )
    err.verb, err.resource, err.namespace, err.user = verb, resource, namespace, user  # type: ignore[attr-defined]
    return err


def api_error(exc: ApiException, doing: str, verb: str, resource: str, namespace: str | None,
              server: str = "") -> ClusterError:
    """Map an `ApiException` from a call that was `doing` something to a user error."""
    status = getattr(exc, "status", None) or 0
    if status == 403:
        return rbac_error(exc, verb, resource, namespace)
    msg = status_message(getattr(exc, "body", None)) or str(getattr(exc, "reason", "") or exc)
    if status == 401:
        return credentials_rejected(f"cannot {doing} on {server}" if server else f"cannot {doing}", msg)
    if status == 0:
        return ClusterError(f"cannot {doing}", msg, "check that the cluster is reachable (`kubectl get --raw /version`)")
    return ClusterError(f"cannot {doing} (HTTP {status})", msg)


def connect_error(exc: BaseException, server: str, timeout: float | None = None) -> ClusterError:
    """Classify a failure to open a connection to the API server."""
    hint_net = ("check that the cluster is running and reachable from this machine (VPN?); "
                "for the dev cluster run `tpnb devcluster up`")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        t = f" within {timeout:g}s" if timeout else ""
        return ClusterError(f"cannot reach the Kubernetes API server at {server}",
                            f"no answer{t} (connection timed out)", hint_net)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ClusterError(f"TLS verification of the Kubernetes API server {server} failed",
                            exc.verify_message or str(exc),
                            "the kubeconfig's certificate-authority does not match the server's certificate; "
                            "refresh the kubeconfig (or check tls-server-name)")
    if isinstance(exc, ssl.SSLError):
        return ClusterError(f"TLS handshake with the Kubernetes API server {server} failed",
                            exc.reason or str(exc),
                            "check the server URL and the client certificate in the kubeconfig")
    if isinstance(exc, socket.gaierror):
        return ClusterError(f"cannot resolve the Kubernetes API server host of {server}",
                            exc.strerror or str(exc), hint_net)
    if isinstance(exc, OSError):
        if exc.errno:
            why = f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
        else:
            why = str(exc) or type(exc).__name__
        return ClusterError(f"cannot reach the Kubernetes API server at {server}", why, hint_net)
    return ClusterError(f"cannot talk to the Kubernetes API server at {server}",
                        f"{type(exc).__name__}: {exc}", hint_net)


# -------------------------------------------------------------- reachability
async def _raw_get(t: KubeTarget, path: str) -> tuple[int, bytes]:
    """Minimal HTTP/1.1 GET over asyncio with the target's TLS and headers."""
    u = urlsplit(t.server)
    host = u.hostname or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    kw: dict[str, Any] = {}
    if u.scheme == "https":
        kw["ssl"] = t.ssl_context
        kw["server_hostname"] = t.tls_server_name or host
    reader, writer = await asyncio.open_connection(host, port, **kw)
    try:
        hdrs = {"Host": u.netloc, "Accept": "application/json", "User-Agent": "tpnb", "Connection": "close"}
        hdrs.update(await anyio.to_thread.run_sync(t.auth_headers))
        req = f"GET {u.path.rstrip('/')}{path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        writer.write(req.encode("latin-1") + b"\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            return status, bytes(body)
        if "content-length" in fields:
            return status, await reader.readexactly(int(fields["content-length"]))
        return status, await reader.read(1 << 20)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


async def check_reachable(t: KubeTarget, timeout: float | None = None) -> str:
    """GET /version and return the server's gitVersion.

    Uses the same asyncio TLS path as the port-forward (not the sync client),
    so "reachable" means "the tunnel can be opened", and a dead server fails
    within `timeout` (default `timeouts.api`) with the errno text instead of
    urllib3's retry chain.
    """
    if timeout is None:
        timeout = config.get().timeouts.api
    try:
        async with asyncio.timeout(timeout):
            status, body = await _raw_get(t, "/version")
    except ClusterError:
        raise
    except (OSError, TimeoutError, ssl.SSLError) as exc:  # first: SSL errors are also ValueErrors
        raise connect_error(exc, t.server, timeout) from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
        raise ClusterError(f"{t.server} does not answer like a Kubernetes API server",
                           f"malformed HTTP response ({type(exc).__name__})",
                           "check the server URL in the kubeconfig") from None
    if status == 200:
        try:
            return str(json.loads(body)["gitVersion"])
        except (ValueError, KeyError, TypeError):
            raise ClusterError(f"{t.server} does not answer like a Kubernetes API server",
                               "GET /version returned no gitVersion",
                               "check the server URL in the kubeconfig") from None
    exc = ApiException(status=status, reason="", body=body.decode("utf-8", "replace"))
    if status == 401:
        raise api_error(exc, "get /version", "get", "/version", None, t.server) from None
    if status == 403:
        raise rbac_error(exc, "get", "/version", None) from None
    raise ClusterError(f"the Kubernetes API server {t.server} answered GET /version with HTTP {status}",
                       status_message(body), "check the server URL in the kubeconfig") from None


# ------------------------------------------------------------------- watches
async def watch_events(t: KubeTarget, path: str, resource_version: str, timeout_seconds: int = 300,
                       connect_timeout: float | None = None) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Follow ``GET path?watch=1`` from `resource_version`: yields (type, object) per event.

    Why raw asyncio and not the kubernetes client's `Watch`: that one blocks a
    thread on a streaming read that cannot be cancelled; this one is a task
    the caller cancels.  Same TLS and credentials as the port-forwards.  The
    server ends the watch after `timeout_seconds` (the caller then watches
    again from the last resourceVersion it saw); BOOKMARK events keep that
    version fresh.  A version the API server no longer has arrives as an
    ERROR event whose object is a 410 Status (the caller lists again); an
    HTTP error (403, 404, ...) raises `ApiException`; transport failures raise
    OSError / ssl.SSLError / asyncio.IncompleteReadError.
    """
    if connect_timeout is None:
        connect_timeout = config.get().timeouts.api
    u = urlsplit(t.server)
    host = u.hostname or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    kw: dict[str, Any] = {"limit": 1 << 20}
    if u.scheme == "https":
        kw["ssl"] = t.ssl_context
        kw["server_hostname"] = t.tls_server_name or host
    query = urlencode({"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                       "timeoutSeconds": str(timeout_seconds)})
    auth = await anyio.to_thread.run_sync(t.auth_headers)
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_connection(host, port, **kw)
    try:
        hdrs = {"Host": u.netloc, "Accept": "application/json", "User-Agent": "tpnb", **auth}
        req = f"GET {u.path.rstrip('/')}{path}?{query} HTTP/1.1\r\n" + \
            "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        writer.write(req.encode("latin-1") + b"\r\n")
        async with asyncio.timeout(connect_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        if status != 200:
            body = b""
            with contextlib.suppress(Exception):
                async with asyncio.timeout(connect_timeout):
                    if "content-length" in fields:
                        body = await reader.readexactly(min(int(fields["content-length"]), 1 << 20))
                    elif chunked:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        body = await reader.readexactly(min(size, 1 << 20))
            raise ApiException(status=status, reason="", body=body.decode("utf-8", "replace"))
        buf = bytearray()
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                buf += await reader.readexactly(size)
                await reader.readexactly(2)
            else:
                data = await reader.read(1 << 16)
                if not data:
                    return
                buf += data
            while (i := buf.find(b"\n")) >= 0:
                line = bytes(buf[:i])
                del buf[: i + 1]
                if not line.strip():
                    continue
                ev = json.loads(line)
                yield str(ev.get("type") or ""), ev.get("object") or {}
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1)


# ------------------------------------------------------------ REST via thread
async def request(
    t: KubeTarget,
    method: str,
    path: str,
    *,
    query: dict[str, Any] | list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str | None = None,
    timeout: float | None = None,
    accept_status: tuple[int, ...] = (),
    raw: bool = False,
) -> Any:
    """One JSON REST call through the sync client, in a worker thread.

    Returns the decoded JSON body (None for statuses in `accept_status` that
    carry no JSON), or the bytes when `raw` (pod logs).  Raises `ApiException` for HTTP errors (callers map them
    with `api_error` because only they know the verb/resource) and
    `ClusterError` for transport failures.

    Plain dicts rather than the generated model classes: manifests, server-side
    apply and unknown API versions (ServiceCIDR beta) all want raw JSON anyway.
    """
    if timeout is None:
        timeout = config.get().timeouts.api
    api = t.api
    q = list(query.items()) if isinstance(query, dict) else list(query or [])
    headers = {"Accept": "*/*" if raw else "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type or "application/json"

    def call() -> tuple[int, bytes]:
        method_, url, hdrs, body_, _ = api.param_serialize(
            method=method,
            resource_path=path,
            query_params=q,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(method_, url, header_params=hdrs, body=body_, _request_timeout=(timeout, timeout))
        data = resp.read()
        return resp.status, data

    try:
        with anyio.fail_after(timeout * 2 + 1):
            status, data = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    except TimeoutError as exc:
        raise connect_error(exc, t.server, timeout) from None
    except urllib3.exceptions.MaxRetryError as exc:
        raise connect_error(_unwrap_urllib3(exc.reason), t.server, timeout) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise connect_error(_unwrap_urllib3(exc), t.server, timeout) from None
    if 200 <= status < 300 or status in accept_status:
        if raw:
            return data
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None
    raise ApiException(status=status, reason="", body=data.decode("utf-8", "replace"))


async def whoami(t: KubeTarget) -> str:
    """The Kubernetes user name the API server sees for these credentials ("" if it will not say)."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    try:
        got = await request(t, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body=body,
                            timeout=min(config.get().timeouts.api, 10))
    except (ApiException, TpnbError) as exc:
        log.debug("SelfSubjectReview failed: %s", exc)
        return ""
    return str((((got or {}).get("status") or {}).get("userInfo") or {}).get("username") or "")


def _unwrap_urllib3(exc: BaseException | None) -> BaseException:
    """urllib3 wraps socket/TLS errors; dig out the original for a clear message."""
    seen = 0
    while exc is not None and seen < 5:
        seen += 1
        if isinstance(exc, (ssl.SSLError, socket.gaierror)):
            return exc
        if isinstance(exc, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError)):
            return TimeoutError(str(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        inner = exc.__cause__ or exc.__context__ or getattr(exc, "reason", None)
        if inner is None or inner is exc:
            break
        exc = inner
    return exc or OSError("unknown connection error")


def path_quote(s: str) -> str:
    return quote(s, safe="")


# ------------------------------------------------------------------- subnets
_SVC_RANGE_RE = re.compile(r"range of valid IPs is (?:CIDR )?([0-9A-Fa-f.:]+/\d+)(?:,? *and *([0-9A-Fa-f.:]+/\d+))?")


def parse_service_range(message: str) -> list[str]:
    """CIDR(s) from the API server's "The range of valid IPs is ..." message."""
    m = _SVC_RANGE_RE.search(message)
    if not m:
        return []
    return [str(ipaddress.ip_network(c, strict=False)) for c in m.groups() if c]


def _collapse(cidrs: list[str]) -> list[str]:
    nets = []
    for c in cidrs:
        try:
            nets.append(ipaddress.ip_network(c, strict=False))
        except ValueError:
            continue
    out: list[str] = []
    for version in (4, 6):
        out += [str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == version)]
    return out


async def cluster_subnets(t: KubeTarget, namespaces: list[str] | tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(pod CIDRs, service CIDRs) the laptop must route into the cluster.

    Why it is this complicated: Kubernetes publishes neither range on an object
    every user can read.

    * Pods: nodes' ``spec.podCIDRs`` (set when the controller-manager allocates
      node CIDRs, as in the dev cluster).  CNIs with their own IPAM (Calico,
      Cilium cluster-pool, cloud VPC CNIs) leave it empty; then we fall back
      to the /16s of the pod IPs we can see.
    * Services: the range is an API server flag.  (1) The ServiceCIDR API
      (networking.k8s.io v1 from 1.33, v1beta1 in 1.31/1.32 where it is off
      by default) states it.  (2) Otherwise a dry-run create of a Service with
      clusterIP 1.1.1.1 makes the allocator reject it with "The range of valid
      IPs is X" -- dryRun=All, so nothing is created, and only the API server
      sees the address (nothing is sent to it).  (3) Else assume the /16 around
      the `kubernetes` Service's IP, which is the first address of the range.

    `namespaces` (the session's) are where a namespace-scoped user may list
    pods and probe; a read such a user may not make only narrows the answer.
    """
    pods = await _pod_cidrs(t, namespaces)
    services = await _service_cidrs(t, namespaces)
    return pods, services


async def _pod_cidrs(t: KubeTarget, namespaces: list[str] | tuple[str, ...] = ()) -> list[str]:
    cidrs: list[str] = []
    try:
        nodes = await request(t, "GET", "/api/v1/nodes")
        for n in nodes.get("items", []):
            spec = n.get("spec") or {}
            cidrs += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    except ApiException as exc:
        if exc.status != 403:
            raise api_error(exc, "list nodes", "list", "nodes", None, t.server) from None
        log.info("cannot list nodes (%s); deriving pod subnets from pod IPs", status_message(exc.body))
    if cidrs:
        return _collapse(cidrs)
    try:
        pods = await request(t, "GET", "/api/v1/pods", query={"limit": 500})
    except ApiException as exc:
        if exc.status != 403:
            raise api_error(exc, "list pods", "list", "pods", None, t.server) from None
        pods = {"items": []}
        for ns in dict.fromkeys([*namespaces, t.namespace]):
            try:
                got = await request(t, "GET", f"/api/v1/namespaces/{path_quote(ns)}/pods")
            except ApiException as exc2:
                if exc2.status != 403:
                    raise api_error(exc2, "list pods", "list", "pods", ns, t.server) from None
                continue
            pods["items"] += got.get("items", [])
    for p in pods.get("items", []):
        if (p.get("spec") or {}).get("hostNetwork"):
            continue
        for ip in (p.get("status") or {}).get("podIPs") or []:
            addr = ipaddress.ip_address(ip["ip"])
            cidrs.append(str(ipaddress.ip_network(f"{addr}/{16 if addr.version == 4 else 64}", strict=False)))
    return _collapse(cidrs)


async def _service_cidrs(t: KubeTarget, namespaces: list[str] | tuple[str, ...] = ()) -> list[str]:
    for version in ("v1", "v1beta1"):
        try:
            res = await request(t, "GET", f"/apis/networking.k8s.io/{version}/servicecidrs")
        except ApiException as exc:
            if exc.status in (403, 404, 405):
                continue
            raise api_error(exc, "list servicecidrs", "list", "servicecidrs.networking.k8s.io", None, t.server) from None
        cidrs = [c for item in res.get("items", []) for c in ((item.get("spec") or {}).get("cidrs") or [])]
        if cidrs:
            log.info("service subnets from the ServiceCIDR API (%s): %s", version, cidrs)
            return _collapse(cidrs)

    probe_ns = [config.get().manager.namespace, *namespaces, t.namespace, "default"]
    for ns in dict.fromkeys(probe_ns):
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "tpnb-service-cidr-probe", "namespace": ns},
            "spec": {"clusterIP": "1.1.1.1", "ports": [{"port": 80, "protocol": "TCP"}]},
        }
        try:
            await request(t, "POST", f"/api/v1/namespaces/{path_quote(ns)}/services",
                          query={"dryRun": "All"}, body=svc)
        except ApiException as exc:
            found = parse_service_range(status_message(exc.body))
            if found:
                log.info("service subnets from a dry-run Service probe in %s: %s", ns, found)
                return found
            if exc.status in (403, 404):
                continue  # not allowed here / namespace missing: try the next one
            log.info("service CIDR probe in %s gave no range: %s", ns, status_message(exc.body))
            break
        else:
            log.warning("service CIDR probe: a Service with clusterIP 1.1.1.1 was accepted (dry run)")
            break

    try:
        svc = await request(t, "GET", "/api/v1/namespaces/default/services/kubernetes")
        ip = ipaddress.ip_address(svc["spec"]["clusterIP"])
        prefix = 16 if ip.version == 4 else 112
        guess = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        log.warning("service subnet unknown; assuming %s around the kubernetes Service IP %s", guess, ip)
        return [guess]
    except ApiException as exc:
        if exc.status == 403:  # a namespace-scoped user: no subnet to route, services by name still work
            log.info("service subnet unknown: may not read the kubernetes Service (%s)", status_message(exc.body))
            return []
        raise api_error(exc, "find the service subnet", "get", "services", "default", t.server) from None
    except (KeyError, TypeError, ValueError):
        raise ClusterError("cannot determine the cluster's service subnet",
                           "no ServiceCIDR API, no range in the probe answer, no kubernetes Service IP") from None


def version_tuple(git_version: str) -> tuple[int, int]:
    """(major, minor) of a gitVersion like v1.32.13+k3s1."""
    m = re.match(r"v?(\d+)\.(\d+)", git_version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

