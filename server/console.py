"""What the server's commands print: the per-round table of a run."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table


def fmt(value: Any, digits: int = 4) -> str:
    """A number for the console ("–" for none or not finite)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def round_table(rows: list[dict[str, Any]], total_sites: int) -> Table:
    """The per-round table shown during and after a run."""
    table = Table(title="medfed rounds")
    findings = list(rows[-1].get("val_auroc_findings", {})) if rows else []
    for col in ("round", "sites", "refused", "train loss", "val AUROC", *[f"AUROC {f}" for f in findings], "max ε",
                "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        eps = max(r.get("epsilon", {}).values(), default=None)
        per = [fmt(r.get("val_auroc_findings", {}).get(f)) for f in findings]
        table.add_row(str(r["round"]), f"{len(r['sites'])}/{total_sites}",
                      ", ".join(r.get("refused", [])) or "–", fmt(r.get("train_loss")),
                      fmt(r.get("val_auroc")), *per, fmt(eps, 3), fmt(r.get("seconds"), 1))
    return table
