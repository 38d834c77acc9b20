"""Fleet-level validation: one table of all regions (each with its report, ``validate.report``)
that says which fail a threshold.

:func:`write_summary` writes the table, ``OUT/summary.md`` and ``OUT/summary.csv``, from one row of
headline figures per region; :func:`summarise` rebuilds it from the region folders ``OUT/REGION/``
alone. ``calozoo.fleet_validation.validate_fleet`` fills those folders from every region's registered
champion.

Thresholds are conditions a region must meet, ``METRIC<=VALUE`` or ``METRIC>=VALUE`` on the report's
headline figures (``validate.report.headline``); a region without a champion, or whose validation
failed, fails too.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from validate.report import HEADLINE, headline

__all__ = ["DEFAULT_THRESHOLDS", "METRICS", "failures", "parse_threshold", "summarise", "write_summary"]

#: the names a threshold may test: the report's headline figures (``validate.report.HEADLINE``)
METRICS = tuple(HEADLINE)

#: what a region must meet by default: E_tot/E_inc and the mean profiles close to the reference.
DEFAULT_THRESHOLDS = ("max_sep_power_etot_per_energy<=0.3", "max_long_rel<=0.3", "max_rad_rel<=0.2")
_THRESHOLD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
SUMMARY_COLUMNS = ("max_sep_power_etot_per_energy", "sep_power_etot", "max_long_rel", "max_rad_rel", "auc_low",
                   "auc_high", "fpd", "kpd")


def parse_threshold(text: str) -> tuple[str, str, float]:
    """``"auc_low<=0.9"`` → ("auc_low", "<=", 0.9); ValueError naming the accepted form, or the
    accepted names (:data:`METRICS`), otherwise."""
    m = _THRESHOLD.match(text)
    if not m:
        raise ValueError(f"threshold {text!r}: expected METRIC<=VALUE or METRIC>=VALUE, e.g. max_long_rel<=0.3")
    if m.group(1) not in METRICS:
        raise ValueError(f"threshold {text!r}: unknown metric {m.group(1)!r}; known: {', '.join(METRICS)}")
    return m.group(1), m.group(2), float(m.group(3))


def failures(row: dict, thresholds) -> list[str]:
    """Why ``row`` (a headline, or an "error") fails the ``thresholds`` (METRIC<=VALUE...): one reason
    each, a figure that is not in the row among them; empty when it passes."""
    if "error" in row:
        return [row["error"]]
    out = []
    for text in thresholds:
        key, op, limit = parse_threshold(text)
        if key not in row:
            out.append(f"{key} not measured")
            continue
        value = row[key]
        if not np.isfinite(value) or (value > limit if op == "<=" else value < limit):
            out.append(f"{key} = {value:.3g} (want {op} {limit:g})")
    return out


def write_summary(rows: list[dict], out_dir, thresholds=DEFAULT_THRESHOLDS) -> list[dict]:
    """Add ``fails`` to each row (a list of reasons, empty when it passes) and write
    ``summary.md`` (failing regions first) and ``summary.csv``; return the rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row["fails"] = failures(row, thresholds)
    rows = sorted(rows, key=lambda r: (not r["fails"], r["region"]))
    cols = [c for c in SUMMARY_COLUMNS if any(c in r for r in rows)]
    failing = [r for r in rows if r["fails"]]
    lines = ["# Fleet validation", "",
             f"{len(rows)} regions, **{len(failing)} failing** the thresholds: "
             + ", ".join(f"`{t}`" for t in thresholds) + ".", "",
             "| region | model | " + " | ".join(cols) + " | verdict |", "|---|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        cells = [f"{r[c]:.3g}" if c in r else "–" for c in cols]
        verdict = "FAIL: " + "; ".join(r["fails"]) if r["fails"] else "ok"
        link = f"[{r['region']}]({r['region']}/report.md)" if "error" not in r else r["region"]
        lines.append(f"| {link} | {r.get('model', '–')} | " + " | ".join(cells) + f" | {verdict} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["region", "model", *cols, "passes", "fails"])
        for r in rows:
            w.writerow([r["region"], r.get("model", ""), *[r.get(c, "") for c in cols], not r["fails"],
                        "; ".join(r["fails"])])
    return rows


def summarise(out_dir, thresholds=DEFAULT_THRESHOLDS) -> list[dict]:
    """The summary table from the region folders of ``out_dir`` (each with a ``metrics.json``)."""
    rows = []
    for path in sorted(Path(out_dir).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        rows.append({"region": path.parent.name, "model": m["generated"], **headline(m)})
    if not rows:
        raise FileNotFoundError(f"{out_dir}: no <region>/metrics.json")
    return write_summary(rows, out_dir, thresholds)
