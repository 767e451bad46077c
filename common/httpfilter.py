"""Personal intercepts' filters: what an InterceptSpec's HTTP conditions mean.

Shared by the connector (checks them before asking), the manager (conflicts
between sessions' filters) and the agent (cluster/httproute.py matches each
request).  Pure logic on the proto's InterceptSpec; stdlib only, so the
cluster image can import it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


def is_filtered(spec: Any) -> bool:
    """Whether an InterceptSpec is a personal (filtered) intercept."""
    return bool(list(spec.http_headers) or spec.http_path_prefix or spec.http_path_equal or spec.http_path_regex)


def filter_key(spec: Any) -> tuple[Any, ...]:
    """Two specs with equal keys select exactly the same requests."""
    return (tuple(sorted((h.name.lower(), h.value) for h in spec.http_headers)),
            spec.http_path_prefix, spec.http_path_equal, spec.http_path_regex)


def describe(spec: Any) -> str:
    """'header x-a=1, path prefix /api' (for messages); 'all connections' when unfiltered."""
    parts = [f"header {h.name}={h.value}" for h in spec.http_headers]
    if spec.http_path_prefix:
        parts.append(f"path prefix {spec.http_path_prefix}")
    if spec.http_path_equal:
        parts.append(f"path {spec.http_path_equal}")
    if spec.http_path_regex:
        parts.append(f"path matching {spec.http_path_regex}")
    return ", ".join(parts) or "all connections"


def check(spec: Any) -> str:
    """'' if the spec's filters are usable, else what is wrong with them."""
    paths = [p for p in (spec.http_path_prefix, spec.http_path_equal, spec.http_path_regex) if p]
    if len(paths) > 1:
        return "give one of --http-path-prefix, --http-path-equal, --http-path-regex"
    for h in spec.http_headers:
        if not h.name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", h.name):
            return f"invalid HTTP header name {h.name!r}"
        if "\r" in h.value or "\n" in h.value:
            return f"invalid value for header {h.name}"
    for p in (spec.http_path_prefix, spec.http_path_equal):
        if p and not p.startswith("/"):
            return f"path {p!r} must start with /"
    if spec.http_path_regex:
        try:
            re.compile(spec.http_path_regex)
        except re.error as exc:
            return f"invalid --http-path-regex {spec.http_path_regex!r}: {exc}"
    return ""


@dataclass(frozen=True)
class Filter:
    """The request matcher of one filtered intercept (every condition given must hold)."""

    headers: tuple[tuple[bytes, bytes], ...] = ()
    path_prefix: str = ""
    path_equal: str = ""
    path_regex: re.Pattern[str] | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> Filter:
        return cls(headers=tuple((h.name.lower().encode("latin-1"), h.value.encode("latin-1"))
                                 for h in spec.http_headers),
                   path_prefix=spec.http_path_prefix, path_equal=spec.http_path_equal,
                   path_regex=re.compile(spec.http_path_regex) if spec.http_path_regex else None)

    def matches(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """`headers` as h11 gives them: names lowercased."""
        for name, value in self.headers:
            if not any(n == name and v == value for n, v in headers):
                return False
        if self.path_prefix or self.path_equal or self.path_regex is not None:
            path = target.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")
            if path.startswith(("http://", "https://")):  # absolute-form (a proxy request)
                rest = path.split("://", 1)[1]
                path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
            if self.path_equal and path != self.path_equal:
                return False
            if self.path_prefix and not path.startswith(self.path_prefix):
                return False
            if self.path_regex is not None and not self.path_regex.fullmatch(path):
                return False
        return True
