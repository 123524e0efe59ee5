"""Reading the server's own account of where a request's time went.

Two sources: the ``Server-Timing`` response header (per request: queue wait, compute, encode,
and the batch size the image was computed in) and the Prometheus ``/metrics`` text (aggregate
batch-size histogram, used when a server does not put the batch size in the header). Both are
parsed leniently: the load generator must work against any server, including ones that emit
neither.
"""

from __future__ import annotations

import math
import re

# canonical name -> names a server may use for it
_ALIASES: dict[str, tuple[str, ...]] = {
    "queue": ("queue", "queue_wait", "queuewait", "wait", "queued"),
    "compute": ("compute", "forward", "infer", "inference", "model"),
    "encode": ("encode", "encoding", "png"),
    "decode": ("decode", "decoding", "validate"),
    "total": ("total", "app", "server"),
    "batch_size": ("batch", "batch_size", "batchsize", "bs"),
}
_CANONICAL = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?$")


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``'queue;dur=1.5, compute;dur=20, encode;dur=3, batch;desc="4"'`` ->
    ``{"queue": 1.5, "compute": 20.0, "encode": 3.0, "batch_size": 4.0}``.

    Durations are milliseconds (the Server-Timing spec's unit). For ``batch_size`` the value may
    sit in ``dur`` or ``desc``. Unknown metric names are kept under their own (lower-case) name;
    entries without a number are dropped.
    """
    out: dict[str, float] = {}
    if not header:
        return out
    for entry in _split_entries(header):
        parts = [p.strip() for p in entry.split(";")]
        name = parts[0].lower()
        if not name:
            continue
        params: dict[str, str] = {}
        for part in parts[1:]:
            if "=" in part:
                key, _, value = part.partition("=")
                params[key.strip().lower()] = value.strip().strip('"')
        value = _number(params.get("dur"))
        if value is None:
            value = _number(params.get("desc"))
        if value is None:
            continue
        out[_CANONICAL.get(name, name)] = value
    return out


def _split_entries(header: str) -> list[str]:
    """Split on commas that are not inside a quoted ``desc``."""
    entries, current, quoted = [], [], False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def _number(text: str | None) -> float | None:
    if text is None or not _NUMBER.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {``name{labels}``: value}; comments and junk lines ignored."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line.strip())
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        out[match.group(1) + (match.group(2) or "")] = value
    return out


def histogram_delta(
    before: dict[str, float], after: dict[str, float], name_contains: str
) -> tuple[float, float]:
    """(sum, count) added between two scrapes to histograms whose name contains the text.

    Summed over all label sets (e.g. one histogram per model), so the mean is sum / count.
    """
    total_sum = total_count = 0.0
    for series, value in after.items():
        metric = series.split("{", 1)[0]
        if name_contains not in metric:
            continue
        if metric.endswith("_sum"):
            total_sum += value - before.get(series, 0.0)
        elif metric.endswith("_count"):
            total_count += value - before.get(series, 0.0)
    return total_sum, total_count
