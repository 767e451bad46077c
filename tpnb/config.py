"""Configuration in one place.

Defaults live in `Config` below; a user overrides them in
`~/.config/tpnb/config.yaml` (same nested keys) or with `TPNB_<SECTION>_<KEY>`
environment variables.  `tpnb config view` prints the merged result with the
source of each value, so nothing is hidden.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _home() -> Path:
    # When run through sudo, logs and config still belong to the real user.
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and os.geteuid() == 0:
        import pwd

        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path(os.environ.get("HOME") or "/root")


def netns_id() -> str:
    """Identity of the network namespace we run in.

    The daemon is "one per machine", and a laptop network namespace is a
    machine: two laptops on one host must not share a daemon socket.
    """
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "default"


@dataclass
class ManagerConfig:
    namespace: str = "tpnb"
    #: empty: tpnb.local/tpnb:<version>-<source hash> (see tpnb/imageref.py)
    image: str = ""
    #: the client API: on the manager pod's loopback only, reached through a port-forward
    grpc_port: int = 8081
    #: the agents' API: on the pod network (the traffic-manager Service), token-authenticated
    agent_port: int = 8082
    #: seconds without a heartbeat before a client session (and its intercepts) expires
    session_ttl: int = 15
    #: "auto": connect installs or upgrades a manager it installed itself (never
    #: one a cluster admin installed with Helm, nor without the rights to);
    #: "never": only use the manager that is there
    install: str = "auto"


@dataclass
class AgentConfig:
    #: empty: same image as the manager
    image: str = ""
    port: int = 9900
    #: the readiness probe's port: accepts connections and closes them, serves nothing
    health_port: int = 9901
    #: the file service, on the pod's loopback only (brokered to the intercept's holder)
    sftp_port: int = 9902
    mount_prefix: str = "/tpnb/volumes"
    #: intercepted connections straight from the agent pods to the connector over one link per
    #: pod (issue 15): "auto" (an HTTP upgrade through the API server's pods/proxy where `get
    #: pods/proxy` is allowed and the agent offers it, else a port-forward to the pod's link port
    #: where `pods/portforward` is, else the traffic-manager), "port-forward" (never pods/proxy),
    #: "never" (always the traffic-manager)
    link: str = "auto"


@dataclass
class ConnectorConfig:
    #: empty: $XDG_RUNTIME_DIR/tpnb/<netns inode>/connector.sock (else /tmp/tpnb-<uid>/...)
    socket: str = ""
    #: system-wide outbound (the root daemon: TUN, routes, DNS): "auto" (when
    #: running as root or sudo needs no password), "always" (fail without it), "never"
    outbound: str = "auto"
    #: in-cluster mode (the client runs in a pod of the cluster: no tunnel for
    #: outbound, no root daemon, the pod's ServiceAccount): "auto" (when the pod's
    #: environment says so: KUBERNETES_SERVICE_HOST and a mounted ServiceAccount),
    #: "always", "never"
    in_cluster: str = "auto"
    #: how outbound TCP to pods and Services travels (issue 15): "direct" port-forwards from
    #: the connector straight to the pod behind the address (as `kubectl port-forward` does;
    #: needs `create pods/portforward`; the app sees 127.0.0.1 as the peer and
    #: NetworkPolicies do not apply), "manager" (every flow through the traffic-manager,
    #: with pod-network semantics), or "auto" (direct where RBAC allows, else the manager).
    #: "direct" fails `connect` when RBAC allows port-forwards in none of the session's
    #: namespaces; flows it cannot map to a pod (UDP, DNS, unknown addresses, denied
    #: namespaces) still use the manager in every mode
    data_plane: str = "auto"


@dataclass
class DaemonConfig:
    """The root daemon (and, for compatibility, the manager link's settings the connector reads)."""

    #: empty: /run/tpnb/<netns inode>/daemon.sock
    socket: str = ""
    tun_name: str = "tpnb0"
    #: address the laptop's resolver points at; served by the daemon inside the TUN
    dns_ip: str = "169.254.53.53"
    #: TCP to the cluster: "kernel" (nftables REDIRECT to the daemon; the kernel's
    #: TCP stack, ~2x faster), "tun" (user-space TCP in the TUN engine), or
    #: "auto" (kernel when `nft` works, else tun)
    tcp_engine: str = "auto"
    #: the port-forward to the traffic-manager: "spdy" (cheapest for the
    #: kubelet and runtime), "websocket", or "auto" (SPDY, else WebSocket)
    portforward_protocol: str = "auto"
    #: Tunnel RPCs the root daemon keeps started ahead of need, so a new TCP
    #: connection skips the RPC's setup on both ends (0: start one per connection)
    tunnel_pool: int = 4
    heartbeat_seconds: float = 3.0
    connect_timeout: float = 30.0


@dataclass
class TimeoutConfig:
    #: a single Kubernetes API call (an unreachable server fails within this)
    api: float = 8.0
    rollout: float = 180.0
    intercept: float = 120.0
    #: how long `tpnb intercept` waits for the agent links to come up (meanwhile, and if they do
    #: not, the traffic-manager carries the connections)
    agent_link: float = 3.0


@dataclass
class LogConfig:
    #: empty: ~/.cache/tpnb/logs
    dir: str = ""
    level: str = "info"


@dataclass
class WiretapConfig:
    #: bytes of each request and response body a wiretap copies (the rest is only counted)
    max_body: int = 4096
    #: records each hop (agent, manager, connector) holds for a slow reader before it drops them
    buffer: int = 1000


@dataclass
class Config:
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    logs: LogConfig = field(default_factory=LogConfig)
    wiretap: WiretapConfig = field(default_factory=WiretapConfig)
    #: where each value came from: "default", the config file path, or the env var
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------ derived paths
    @property
    def socket_path(self) -> Path:
        if self.daemon.socket:
            return Path(self.daemon.socket)
        return Path("/run/tpnb") / netns_id() / "daemon.sock"

    @property
    def connector_socket(self) -> Path:
        """The user's connector: in a directory only that user can enter."""
        if self.connector.socket:
            return Path(self.connector.socket)
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
            base = Path(runtime) / "tpnb"
        else:
            base = Path("/tmp") / f"tpnb-{os.getuid()}"
        return base / netns_id() / "connector.sock"

    @property
    def manager_image(self) -> str:
        if self.manager.image:
            return self.manager.image
        from .imageref import default_image

        return default_image()

    @property
    def agent_image(self) -> str:
        return self.agent.image or self.manager_image

    @property
    def log_dir(self) -> Path:
        if self.logs.dir:
            return Path(self.logs.dir)
        return _home() / ".cache" / "tpnb" / "logs"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        return out


def config_file() -> Path:
    env = os.environ.get("TPNB_CONFIG")
    if env:
        return Path(env)
    return _home() / ".config" / "tpnb" / "config.yaml"


def _invalid(value: Any, where: str, expected: str) -> ConfigError:
    """The one wording for a setting whose value cannot be used."""
    return ConfigError(f"invalid value {value!r} for {where}", expected,
                       "fix the value or remove it to use the default (see `tpnb config view`)")


def _coerce(current: Any, raw: Any, where: str) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(raw, str):
                return raw.strip().lower() in ("1", "true", "yes", "on")
            return bool(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise _invalid(raw, where, f"expected a {type(current).__name__}") from None


#: sections of the same file that other packages read (tpnb_devcluster.config)
OTHER_SECTIONS = ("devcluster",)

#: keys whose value must be one of a few words
CHOICES: dict[str, tuple[str, ...]] = {
    "daemon.tcp_engine": ("auto", "kernel", "tun"),
    "connector.outbound": ("auto", "always", "never"),
    "connector.in_cluster": ("auto", "always", "never"),
    "connector.data_plane": ("auto", "direct", "manager"),
    "manager.install": ("auto", "never"),
    "daemon.portforward_protocol": ("auto", "spdy", "websocket"),
    "agent.link": ("auto", "port-forward", "never"),
}


def _check_ports(cfg: Config) -> None:
    """Every `*port` setting is a TCP port: gRPC, for one, silently wraps 70000 to 4464."""
    for f in dataclasses.fields(cfg):
        sect = getattr(cfg, f.name)
        if f.name == "sources" or not dataclasses.is_dataclass(sect):
            continue
        for g in dataclasses.fields(sect):
            value = getattr(sect, g.name)
            if (g.name == "port" or g.name.endswith("_port")) and type(value) is int and not 1 <= value <= 65535:
                dotted = f"{f.name}.{g.name}"
                raise _invalid(value, f"{dotted} (set in {cfg.sources.get(dotted)})", "expected a TCP port, 1-65535")


def _check_choices(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        sect, key = dotted.split(".")
        value = getattr(getattr(cfg, sect), key)
        if value not in allowed:
            raise _invalid(value, f"{dotted} (set in {cfg.sources.get(dotted)})",
                           f"expected one of: {', '.join(allowed)}")


def load() -> Config:
    """Defaults, then the config file, then TPNB_<SECTION>_<KEY> variables."""
    cfg = Config()
    for sect in cfg.as_dict():
        for key in getattr(cfg, sect).__dataclass_fields__:
            cfg.sources[f"{sect}.{key}"] = "default"

    path = config_file()
    if path.exists():
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {path}", str(exc).splitlines()[0],
                              "fix the YAML or move the file away") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections", hint="see `tpnb config view`")
        for sect, values in data.items():
            if sect in OTHER_SECTIONS:
                continue
            if not hasattr(cfg, sect) or sect == "sources" or not isinstance(values, dict):
                raise ConfigError(f"unknown config section {sect!r} in {path}",
                                  hint=f"known sections: {', '.join(cfg.as_dict())}")
            obj = getattr(cfg, sect)
            for key, raw in values.items():
                if key not in obj.__dataclass_fields__:
                    raise ConfigError(f"unknown key {sect}.{key} in {path}",
                                      hint=f"known keys: {', '.join(obj.__dataclass_fields__)}")
                setattr(obj, key, _coerce(getattr(obj, key), raw, f"{sect}.{key}"))
                cfg.sources[f"{sect}.{key}"] = str(path)

    for sect in cfg.as_dict():
        obj = getattr(cfg, sect)
        for key in obj.__dataclass_fields__:
            var = f"TPNB_{sect.upper()}_{key.upper()}"
            if var in os.environ:
                setattr(obj, key, _coerce(getattr(obj, key), os.environ[var], var))
                cfg.sources[f"{sect}.{key}"] = var
    _check_choices(cfg)
    _check_ports(cfg)
    return cfg


_cached: Config | None = None


def get() -> Config:
    """The process-wide configuration (loaded once)."""
    global _cached
    if _cached is None:
        _cached = load()
    return _cached
