"""How %tp results and errors look in a notebook.

Results are ordinary Python values (a dict, a list of dicts, a str) so code can
use them (`env = %tp env hello`; `pd.DataFrame(%tp requests hello)`); they
subclass dict/list only to add an HTML table for display.  Errors are raised
`TpnbError`s that IPython shows as their what / why / fix lines
(`TpnbError._render_traceback_`), never a traceback; `report_error` prints the
same lines where nothing can be raised (widgets' callbacks).
"""
from __future__ import annotations

import html
import sys
from typing import Any, Iterable

from ..errors import TpnbError


def report_error(err: BaseException) -> None:
    """Print a TpnbError (or an interrupt) as its readable lines on stderr."""
    if isinstance(err, KeyboardInterrupt):
        text = "interrupted"
    elif isinstance(err, TpnbError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    print(text, file=sys.stderr, flush=True)


def html_table(headers: Iterable[str], rows: Iterable[Iterable[Any]], max_cell: int = 200) -> str:
    def cell(v: Any) -> str:
        s = "" if v is None else str(v)
        if len(s) > max_cell:
            s = s[:max_cell] + "…"
        return html.escape(s)

    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left;font-family:monospace'>{cell(v)}</td>"
                                     for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class EnvTable(dict):
    """The pod environment: a plain dict that displays as a two-column table."""

    def _repr_html_(self) -> str:
        if not self:
            return "<i>empty environment</i>"
        return html_table(["Variable", "Value"], sorted(self.items()))


class RequestTable(list):
    """Request log records: a plain list of dicts that displays as a table."""

    COLUMNS = ("time", "method", "path", "status", "duration_ms", "bytes", "app_version")

    def _repr_html_(self) -> str:
        if not self:
            return "<i>no requests served yet</i>"
        return html_table(self.COLUMNS, ([r.get(c) for c in self.COLUMNS] for r in self))
