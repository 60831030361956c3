"""The report renders from an autoescaped template: text that reaches it (a problem's file
name, a note) is escaped, charts stay markup, every section is there."""

from __future__ import annotations

from pathlib import Path

from privacy.audit.crosscheck import Problem
from privacy.audit.report import SECTIONS, ReportData, render
from privacy.audit.verify import Verdict


def test_the_template_escapes_text_and_keeps_the_charts(tmp_path: Path) -> None:
    verdict = Verdict(ok=False, chains={}, problems=[Problem("<script>alert(1)</script>.jsonl", 3, "bad & <b>worse</b>")],
                      trust="roster <x>")
    rounds = [{"round": 1, "sites": ["site-1"], "train_loss": 0.5, "val_loss": 0.6, "val_auroc": 0.7, "epsilon": {}},
              {"round": 2, "sites": ["site-1"], "train_loss": 0.4, "val_loss": 0.5, "val_auroc": 0.8, "epsilon": {}}]
    html = render(ReportData(tmp_path, {"run_id": "r<1>", "rounds": rounds}, verdict, [], notes=["note <i>"]))
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;.jsonl, seq 3" in html
    assert "bad &amp; &lt;b&gt;worse&lt;/b&gt;" in html and "note &lt;i&gt;" in html and "roster &lt;x&gt;" in html
    assert "run r&lt;1&gt;</title>" in html
    assert html.count("<svg") == 2 and html.count('<section id="') == len(SECTIONS)  # charts are not escaped
    assert "Audit verification FAILED" in html and '<p class="muted">not recorded</p>' in html
