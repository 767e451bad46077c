"""A wiretap's records as a live list: what `%tp wiretap NAME` returns in a notebook.

The list fills from a background thread while the wiretap runs (the kernel's
own thread stays free for cells), so `log = %tp wiretap hello` then, a moment
later, `len(log)`, `log[-1]["status"]` or `log.df()` show what has arrived so
far.  Records are the dicts of `tpnb.api.wiretap_record`, in the shape of
`tpnb.requests_log` (time, type, method, path, status, duration_ms, ...); a gRPC
call over HTTP/2 has its method as `path` and its status as `grpc_code` (trailers
in `response_trailers`).
`stop()` (or `%tp wiretap --stop NAME`, `%tp leave NAME`, the kernel's end)
ends the wiretap and removes it from the cluster.
"""
from __future__ import annotations

import threading
from typing import Any

from .api import WiretapStream
from .errors import TpnbError

#: columns of a wiretap DataFrame, in order (other fields follow)
COLUMNS = ("time", "type", "method", "path", "query", "status", "duration_ms", "bytes", "client", "pod",
           "error", "grpc_code", "request_headers", "request_body", "response_headers", "response_body",
           "response_trailers")


class WiretapLog(list):
    """The records of one running wiretap: a plain list of dicts that keeps filling.

    `.df()` / `.to_dataframe()`: a pandas DataFrame of the records so far (pandas
    must be installed); `.dropped`: records lost because this machine read too
    slowly (counted at every hop); `.running`; `.error` once it ended on a failure;
    `.stop()`; `.wait(n, timeout)` until n records are in.
    """

    def __init__(self, stream: WiretapStream) -> None:
        super().__init__()
        self.name = stream.name
        self._stream = stream
        self._cond = threading.Condition()
        self.error: TpnbError | None = None
        self._thread = threading.Thread(target=self._fill, name=f"tpnb-wiretap-{self.name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- filling
    def _fill(self) -> None:
        try:
            for rec in self._stream:
                with self._cond:
                    self.append(rec)
                    self._cond.notify_all()
        except TpnbError as err:
            self.error = err
        finally:
            with self._cond:
                self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def dropped(self) -> int:
        return max(self._stream.stats.dropped, max((r["dropped"] for r in self[-1:]), default=0))

    def wait(self, count: int, timeout: float = 30.0) -> bool:
        """Until `count` records are in (True), the wiretap ended or `timeout` passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self) >= count or not self.running, timeout) and len(self) >= count

    def stop(self, timeout: float = 10.0) -> None:
        """End the wiretap (it is removed from the cluster); the records stay."""
        self._stream.cancel()
        self._thread.join(timeout)

    # ---------------------------------------------------------- as data
    def records(self) -> list[dict]:
        with self._cond:
            return list(self)

    def to_dataframe(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise TpnbError("pandas is not installed", "a DataFrame needs pandas",
                            "pip install pandas, or use the records as a list of dicts") from None
        records = self.records()
        if not records:
            return pd.DataFrame(columns=list(COLUMNS))
        df = pd.DataFrame.from_records(records)
        df["time"] = pd.to_datetime(df["time"])
        return df[[c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]]

    df = to_dataframe

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<wiretap {self.name}: {len(self)} records, {self.dropped} dropped, {state}>"

    def _repr_html_(self) -> str:
        from .magics.output import html_table

        shown = self.records()[-20:]
        grpc = any(r.get("grpc_code") is not None for r in shown)   # gRPC calls: their status beside HTTP's
        cols = ("time", "method", "path", "status", *(("grpc_code",) if grpc else ()), "duration_ms", "bytes", "client")
        head = f"<b>wiretap {self.name}</b>: {len(self)} records, {self.dropped} dropped, " + \
            ("running" if self.running else "stopped")
        return head + html_table(cols, ([r.get(c) for c in cols] for r in shown))
