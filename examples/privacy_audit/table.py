"""Collect examples/privacy_audit runs into OUT/results.md and OUT/roc.svg (numbers only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from privacy.attacks.result import attack_result
from privacy.audit.svg import line_chart

HEAD = ("| ε (site-1's budget) | secure aggregation | validation AUROC | membership AUROC loss / calibrated | "
        "TPR at 1% FPR loss / calibrated | inversion SSIM plain / DP / aggregate of 5 (an unrelated patient: median SSIM) | "
        "canary ε lower bound (right / guesses) | accountant ε |")


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main(out: Path) -> None:
    rows, curves = [HEAD, "|" + "---|" * HEAD.count(" |")], {}
    for run in sorted(out.glob("eps-*-secagg-*"), key=lambda p: (p.name.split("-")[1] != "inf", p.name)):
        path = run / "attacks.json"
        if not path.is_file():
            continue
        sites = [attack_result(r) for r in json.loads(path.read_text())["sites"].values()]
        r = next(s for s in sites if "membership" in s)  # membership and inversion at one site, canaries maybe at another
        c = next(s for s in sites if "canary" in s)["canary"]
        eps, secagg = run.name.split("-")[1], run.name.split("-")[3]
        m, inv = r["membership"], r["inversion"]
        loss, cal = m["loss"], m.get("calibrated", {})
        rows.append(f"| {'∞ (no DP)' if eps == 'inf' else eps} | {secagg} | {_f(r['utility'].get('val_auroc'))} | "
                    f"{_f(loss['auroc'])} / {_f(cal.get('auroc'))} | {_f(loss['tpr_at_1pct_fpr'])} / "
                    f"{_f(cal.get('tpr_at_1pct_fpr'))} | {_f(inv['plain']['ssim'])} / {_f(inv['dp']['ssim'])} / "
                    f"{_f(inv['aggregate']['ssim'])} ({_f(inv.get('reference', {}).get('median_ssim'))}) | "
                    f"{_f(c['epsilon_lower_bound'])} ({c['correct']}/{c['guesses']}) | "
                    f"{_f(c['accountant_epsilon']) if c['accountant_epsilon'] is not None else '∞'} |")
        if secagg == "on":
            curves[f"ε={eps} (loss)"] = list(zip(loss["roc_fpr"], loss["roc_tpr"], strict=True))
    curves["chance"] = [(0.0, 0.0), (1.0, 1.0)]
    (out / "results.md").write_text("\n".join(rows) + "\n")
    (out / "roc.svg").write_text(line_chart(curves, title="membership inference ROC at site-1 (patients)",
                                            y_label="TPR", x_label="FPR", x_ticks=(0.0, 0.25, 0.5, 0.75, 1.0)))
    print("\n".join(rows))
    print(f"written: {out / 'results.md'}, {out / 'roc.svg'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/privacy-audit"))
