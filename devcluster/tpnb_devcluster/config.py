"""The dev cluster's settings: the `devcluster` section of tpnb's config.

Same file and same rules as `tpnb.config` (defaults below, then the
`devcluster:` mapping in `~/.config/tpnb/config.yaml` or $TPNB_CONFIG, then
`TPNB_DEVCLUSTER_<KEY>` variables); tpnb itself skips this section.
`tpnb devcluster config` prints it with the source of each value.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from tpnb import config as tpnb_config
from tpnb.errors import ConfigError

SECTION = "devcluster"


@dataclass
class DevClusterConfig:
    state_dir: str = "/var/lib/tpnb/devcluster"
    run_dir: str = "/run/tpnb-devcluster"
    node_netns: str = "tpnb-node"
    #: the link between node and laptops; the API server listens on its first address
    lan_cidr: str = "10.250.0.0/24"
    pod_cidr: str = "10.42.0.0/16"
    node_pod_cidr: str = "10.42.0.0/24"
    service_cidr: str = "10.43.0.0/16"
    dns_service_ip: str = "10.43.0.10"
    api_port: int = 6443
    k8s_version: str = "v1.32.13"
    #: how many nodes `up` boots (the first runs the control plane too); `up --nodes N` overrides it
    nodes: int = 1
    #: the link between the nodes (node 1 has its first address, node i the i-th); it never
    #: reaches the laptops or the host
    node_link_cidr: str = "10.249.0.0/24"
    #: development only: a taint (KEY=VALUE:EFFECT) for the nodes `up` adds, so only pods that
    #: tolerate it land there while a node is being worked on; empty (the default): no taint
    node_taint: str = ""
    #: where each value came from: "default", the config file path, or the env var
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sources"}


def load() -> DevClusterConfig:
    """Defaults, then the config file's `devcluster` section, then TPNB_DEVCLUSTER_<KEY> variables."""
    cfg = DevClusterConfig()
    keys = list(cfg.as_dict())
    for key in keys:
        cfg.sources[f"{SECTION}.{key}"] = "default"

    path = tpnb_config.config_file()
    if path.exists():
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {path}", str(exc).splitlines()[0],
                              "fix the YAML or move the file away") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections", hint="see `tpnb config view`")
        values = data.get(SECTION)
        if values is not None:
            if not isinstance(values, dict):
                raise ConfigError(f"config section {SECTION!r} in {path} must be a mapping",
                                  hint=f"known keys: {', '.join(keys)}")
            for key, raw in values.items():
                if key not in keys:
                    raise ConfigError(f"unknown key {SECTION}.{key} in {path}",
                                      hint=f"known keys: {', '.join(keys)}")
                setattr(cfg, key, tpnb_config._coerce(getattr(cfg, key), raw, f"{SECTION}.{key}"))
                cfg.sources[f"{SECTION}.{key}"] = str(path)

    for key in keys:
        var = f"TPNB_{SECTION.upper()}_{key.upper()}"
        if var in os.environ:
            setattr(cfg, key, tpnb_config._coerce(getattr(cfg, key), os.environ[var], var))
            cfg.sources[f"{SECTION}.{key}"] = var
    return cfg


_cached: DevClusterConfig | None = None


def get() -> DevClusterConfig:
    """The process-wide dev cluster configuration (loaded once)."""
    global _cached
    if _cached is None:
        _cached = load()
    return _cached
