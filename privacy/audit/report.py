"""The compliance report: one self-contained HTML page (and a PDF of it) built from a run
directory's metrics, the signed audit logs and the sites' signed exports.

Every section reads its own inputs and says "not recorded" when they are absent. The
report holds numbers, names of sites, run ids and hashes only.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from privacy.attacks.result import attack_result
from privacy.audit.crosscheck import load_metrics
from privacy.audit.events import SERVER_ACTOR, E
from privacy.audit.export import KIND, ExportError, summarize, verify_export
from privacy.audit.log import Entry, read_entries
from privacy.audit.svg import line_chart
from privacy.audit.trust import Trust
from privacy.audit.verify import Verdict, run_logs, segment_files, verify_paths
from privacy.files import atomic_write_bytes

NOT_RECORDED = "not recorded"


@dataclass
class ReportData:
    run_dir: Path
    metrics: dict[str, Any]
    verdict: Verdict
    server: list[Entry]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> summary of this run
    sources: dict[str, str] = field(default_factory=dict)  # site -> "signed log" | "signed export"
    notes: list[str] = field(default_factory=list)


def gather(run_dir: Path, site_sources: Sequence[Path], trust: Trust, *, server_only: bool = False,
           allow_missing: Sequence[str] = ()) -> ReportData:
    """Read and verify (with the out-of-band keys of ``trust``) everything the report shows."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: pass the run directory that `simulate` or `run` wrote")
    metrics = load_metrics(metrics_path)
    logs = run_logs(run_dir)
    exports: list[dict[str, Any]] = []
    for src in site_sources:
        if (src / "audit.jsonl").exists():
            files = segment_files(src / "audit.jsonl")
            first = read_entries(files[0])
            logs[first[0].actor if first else src.name] = files
        for f in sorted(src.glob("*.json")) if src.is_dir() else [src]:
            try:
                obj = json.loads(f.read_text())
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("kind") == KIND:
                exports.append(obj)
    verdict = verify_paths(logs, trust, metrics, server_only=server_only, allow_missing=allow_missing)
    run_id = str(metrics.get("run_id"))
    server = verdict.chains[SERVER_ACTOR].entries if SERVER_ACTOR in verdict.chains else []
    data = ReportData(run_dir, metrics, verdict, server)
    for actor, chain in verdict.chains.items():
        if actor != SERVER_ACTOR and run_id in (runs := summarize(chain.entries)):
            data.sites[actor] = runs[run_id] | {"head": chain.head, "entries": len(chain.entries)}
            data.sources[actor] = "signed log (verified)" if not chain.problems else "signed log (FAILED verification)"
    for exp in exports:
        site = str(exp.get("site"))
        pinned = trust.key(site)
        if pinned is None:  # an export's own embedded key proves nothing
            data.notes.append(f"export of site {site} not used: its key is not among the out-of-band keys")
            continue
        try:
            verify_export(exp, pinned)
        except ExportError as exc:
            data.notes.append(str(exc))
            continue
        if site not in data.sites and run_id in exp.get("runs", {}):
            data.sites[site] = exp["runs"][run_id] | {"head": exp.get("head"), "entries": exp.get("entries")}
            data.sources[site] = "signed export"
    return data


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: "–" for none or not finite, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


@dataclass
class Section:
    """One section of the report: paragraphs (``(css class, text)``), tables, charts, in order."""

    anchor: str
    title: str
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def p(self, text: str, cls: str = "") -> Section:
        self.blocks.append({"kind": "p", "text": text, "cls": cls})
        return self

    def table(self, head: list[str], rows: list[list[Any]]) -> Section:
        self.blocks.append({"kind": "table", "head": head, "rows": [[fmt(c) for c in r] for r in rows]})
        return self

    def chart(self, svg: str) -> Section:
        """An SVG chart from :func:`privacy.audit.svg.line_chart` (it escapes every text it draws)."""
        self.blocks.append({"kind": "svg", "svg": Markup(svg)})
        return self

    def code(self, label: str, value: Any) -> Section:
        self.blocks.append({"kind": "code", "label": label, "value": fmt(value)})
        return self


def summary_section(d: ReportData) -> Section:
    v = d.verdict
    sec = Section("summary", "Run summary and verdict")
    checked_sites = [a for a in v.checked if a != SERVER_ACTOR]
    agree = (f"the server's log and the logs of {', '.join(checked_sites)} agree" if checked_sites else
             "NO site log was checked (verified with --server-only): what the sites did rests on the server's word")
    if v.ok:
        sec.p("Audit logs verified: every chain, signature and sequence holds, and " + agree
              + ("; metrics.json is what the server's log signed" if v.metrics_checked else "") + ".", "ok")
    else:
        sec.p(f"Audit verification FAILED: {v.problems[0]}", "bad")
    sec.p(f"Logs checked: {', '.join(v.checked) or 'none'}. Keys: {v.trust}"
          + ("" if v.out_of_band else " (not out of band)") + ".")
    if v.counter_signed >= 0:
        sec.p(f"The sites counter-signed the server's log through entry {v.counter_signed}; later entries are signed "
              "by the server alone.", "muted")
    for note in d.notes:
        sec.p(note, "bad")
    if v.unchecked:
        sec.p(f"Not cross-checked (their logs or exports were not given): {', '.join(v.unchecked)}", "muted")
    start = next((e for e in d.server if e.event == E.RUN_START), None)
    end = next((e for e in d.server if e.event == E.RUN_END), None)
    rounds = d.metrics.get("rounds", [])
    final = rounds[-1] if rounds else {}
    return sec.table(["", ""], [
        ["run id", d.metrics.get("run_id")], ["started", start.time if start else None],
        ["ended", end.time if end else None], ["rounds completed", len(rounds)], ["sites", len(d.sites)],
        ["network", d.metrics.get("config", {}).get("model")],
        ["final validation AUROC" + (" (macro over the findings)" if final.get("val_auroc_findings") else ""),
         final.get("val_auroc")],
        *[[f"final validation AUROC, {name}", value] for name, value in final.get("val_auroc_findings", {}).items()],
        ["final model sha256", d.metrics.get("final_model_sha256")],
        ["ended early", d.metrics.get("ended_early")]])


def participants_section(d: ReportData) -> Section:
    rows = [[r["round"], ", ".join(r.get("sites", [])) or "none", ", ".join(r.get("refused", [])) or "–",
             ", ".join(r.get("failed", [])) or "–", str(r.get("model_sha256", ""))[:16]]
            for r in d.metrics.get("rounds", [])]
    return Section("participants", "Participants per round").table(
        ["round", "trained", "refused", "failed / no reply", "global model (sha256, first 16)"], rows)


def training_section(d: ReportData) -> Section:
    rounds = d.metrics.get("rounds", [])
    curves = {"train loss": [(r["round"], _num(r.get("train_loss"))) for r in rounds],
              "validation loss": [(r["round"], _num(r.get("val_loss"))) for r in rounds]}
    auroc = {"validation AUROC": [(r["round"], _num(r.get("val_auroc"))) for r in rounds]}
    return (Section("training", "Training curves").chart(line_chart(curves, title="Loss", y_label="loss"))
            .chart(line_chart(auroc, title="AUROC", y_label="AUROC")))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and v is not None else math.nan


def privacy_section(d: ReportData) -> Section:
    if not d.sites:
        return Section("privacy", "Privacy").p(NOT_RECORDED, "muted")
    series, budgets, rows = {}, {}, []
    for site, s in sorted(d.sites.items()):
        trained = [r for r in s["rounds"] if r.get("epsilon") is not None]
        series[site] = [(float(r["round"]), float(r["epsilon"])) for r in trained]
        budget = s.get("joined", {}).get("max_epsilon")
        if budget is not None:
            budgets[site] = float(budget)
        sigmas = [r["noise_multiplier"] for r in s["rounds"]
                  if r.get("noise_multiplier") is not None and r["status"] == "trained"]
        joined = s.get("joined", {})
        noise = "deterministic (site seed)" if joined.get("deterministic_noise") else (
            "site CSPRNG" if "deterministic_noise" in joined else None)
        refusals = [str(r["round"]) for r in s["rounds"] if r["status"] == "refused"]
        last = trained[-1] if trained else {}
        rows.append([site, budget, last.get("epsilon"), last.get("delta"),
                     f"{min(sigmas):.3g}–{max(sigmas):.3g}" if sigmas else None,
                     last.get("patients") or s.get("joined", {}).get("patients"),
                     ", ".join(refusals) or "–", noise, joined.get("metrics"), d.sources.get(site)])
    chart = line_chart(series, title="ε per site per round (dashed: the site's budget)", y_label="ε", hlines=budgets)
    return Section("privacy", "Privacy (patient-level differential privacy)").chart(chart).table(
        ["site", "budget ε", "ε after run", "δ", "noise multiplier σ", "patients", "refused rounds",
         "noise drawn from", "validation metrics", "source"], rows)


def protection_section(d: ReportData) -> Section:
    sec = Section("protection", "Protection of updates")
    rounds = d.metrics.get("rounds", [])
    if not any("secagg" in r for r in rounds):
        start = next((e for e in d.server if e.event == E.RUN_START), None)
        on = start.data.get("secure_aggregation") if start else None
        return sec.p("secure aggregation: off in every round of this run (the server saw each site's update)"
                     if on is False else "secure aggregation: not recorded")
    rows = [[r["round"], r["secagg"].get("sites"), r["secagg"].get("dropped"), r["secagg"].get("aborted")]
            for r in rounds if "secagg" in r]
    return sec.table(["round", "sites", "dropped (recovered)", "aborted"], rows)


def attacks_section(d: ReportData) -> Section:
    """The sites' own attacks on the run (``medfed-audit attack``, ``simulate --privacy-audit``):
    RUN_DIR/attacks.json, each site's result re-checked against the closed schema."""
    sec = Section("attacks", "Empirical privacy audit")
    path = d.run_dir / "attacks.json"
    if not path.is_file():
        return sec.p(NOT_RECORDED, "muted")
    try:
        sites = {str(name): attack_result(r) for name, r in json.loads(path.read_text())["sites"].items()}
        if any(r.get("site") != name for name, r in sites.items()):
            raise ValueError("a result filed under another site's name")
    except (ValueError, KeyError, TypeError, AttributeError):
        return sec.p(f"{path.name} does not fit the attack result schema and is not shown", "bad")
    for name, r in sorted(sites.items()):
        if r.get("run_id") != d.metrics.get("run_id"):
            sec.p(f"{name}: the attack result is of run {r.get('run_id')}, not of this run: not shown", "bad")
            continue
        sec.p(f"{name}: attacks run at the site against this run's final model "
              f"(sha256 {str(r.get('model_sha256'))[:16]}…); the site's validation AUROC of that model: "
              f"{_shown(r.get('utility', {}).get('val_auroc'))}")
        rows = attack_rows(r)
        curves = {f"{kind} attack": list(zip(s["roc_fpr"], s["roc_tpr"], strict=True))
                  for kind, s in (r.get("membership") or {}).items() if isinstance(s, dict)}
        if curves:
            curves["chance"] = [(0.0, 0.0), (1.0, 1.0)]
            sec.chart(line_chart(curves, title=f"{name}: membership inference ROC (patients)", y_label="TPR",
                                 x_label="FPR", x_ticks=(0.0, 0.25, 0.5, 0.75, 1.0)))
        sec.table(["attack", "measure", "value"], rows)
        if "inversion" in r:
            sec.p(f"{name}: the image grid of the inversion (original | reconstruction) is kept at the site, in its "
                  "workspace under audit/attacks/; it shows patient images and never leaves", "muted")
    return sec


def attack_rows(r: dict[str, Any]) -> list[list[Any]]:
    """The report's table of one site's attack result."""
    rows: list[list[Any]] = []
    for kind, s in (r.get("membership") or {}).items():
        if isinstance(s, dict):
            rows += [[f"membership ({kind})", "AUROC (0.5 = coin)", _shown(s["auroc"])],
                     [f"membership ({kind})", "TPR at 1% / 0.1% FPR",
                      f"{_shown(s['tpr_at_1pct_fpr'])} / {_shown(s['tpr_at_01pct_fpr'])}"],
                     [f"membership ({kind})", "members / non-members", f"{s['members']} / {s['non_members']}"]]
    for kind, s in (r.get("inversion") or {}).items():
        if isinstance(s, dict):
            rows.append([f"inversion ({kind})", "SSIM / PSNR (dB)", f"{_shown(s.get('ssim'))} / {_shown(s.get('psnr'), 1)}"])
    c = r.get("canary")
    if c:
        rows += [["canary audit", f"ε lower bound ({c['confidence']:.0%})", _shown(c["epsilon_lower_bound"])],
                 ["canary audit", "accountant's ε", _shown(c["accountant_epsilon"]) if c["accountant_epsilon"] is not None
                  else "∞ (no DP)"],
                 ["canary audit", "right guesses / guesses / canaries", f"{c['correct']} / {c['guesses']} / {c['canaries']}"],
                 ["canary audit", "bound within the accountant's ε", "yes" if c["within_accountant"] else "NO"]]
    return rows


def _shown(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}"


def software_section(d: ReportData) -> Section:
    sec = Section("software", "Software and fingerprints")
    start = next((e for e in d.server if e.event == E.RUN_START), None)
    if start is None:
        return sec.p(NOT_RECORDED, "muted")
    rows = [[k, v] for k, v in sorted(start.data.get("versions", {}).items())]
    rows += [["code sha256", start.data.get("code_sha256")], ["run config sha256", start.data.get("config_sha256")],
             ["initial model sha256", start.data.get("initial_sha256")]]
    server_code = start.data.get("code_sha256")
    flags = []
    for site, s in sorted(d.sites.items()):
        j = s.get("joined", {})
        code = s.get("code_ran") or j.get("code_sha256")  # the launcher's verified digest wins
        rows.append([f"{site}: data sha256 / images / patients",
                     f"{j.get('data_sha256', '–')} / {j.get('images', '–')} / {j.get('patients', '–')}"])
        rows.append([f"{site}: code sha256 it ran", code or "not recorded"])
        if code is not None and code != server_code:
            flags.append(site)
    if flags:
        sec.p(f"Sites that ran code other than the server's: {', '.join(flags)} (an approved bundle, or another "
              "medfed version)", "bad")
    return sec.table(["", ""], rows)


def hashes_section(d: ReportData) -> Section:
    rows = [[actor, len(c.entries), c.head] for actor, c in d.verdict.chains.items()]
    rows += [[f"{site} (export)", s.get("entries"), s.get("head")] for site, s in d.sites.items()
             if site not in d.verdict.chains]
    return (Section("hashes", "Audit logs: final hashes").table(["log", "entries", "head (sha256)"], rows)
            .code("server head recorded in metrics.json", (d.metrics.get("audit") or {}).get("server_head")))


SECTIONS = (summary_section, participants_section, training_section, privacy_section, protection_section,
            attacks_section, software_section, hashes_section)
TEMPLATES = Environment(loader=PackageLoader("privacy.audit", "templates"), autoescape=select_autoescape(["html"]),
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(d: ReportData) -> str:
    """The report page, from the autoescaped template ``templates/report.html``."""
    return TEMPLATES.get_template("report.html").render(run_id=str(d.metrics.get("run_id")),
                                                        sections=[section(d) for section in SECTIONS])


def write_report(run_dir: Path, trust: Trust, out: Path | None = None, site_sources: Sequence[Path] = (),
                 *, server_only: bool = False, allow_missing: Sequence[str] = ()) -> tuple[Path, ReportData]:
    """Build the report of ``run_dir`` into ``out`` (default ``RUN_DIR/report.html``)."""
    data = gather(run_dir, site_sources, trust, server_only=server_only, allow_missing=allow_missing)
    out = out or Path(run_dir) / "report.html"
    atomic_write_bytes(out, render(data).encode())
    return out, data


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def html_to_pdf(html: Path, pdf: Path, timeout: float = 120) -> None:
    """Print the report with headless Chromium (Debian: ``apt-get install chromium``)."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("the PDF needs Chromium: install it (Debian/Ubuntu: apt-get install chromium) "
                                "and run again; the HTML report was written")
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
           f"--print-to-pdf={pdf}", Path(html).resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if not pdf.is_file() or pdf.stat().st_size == 0:
        raise RuntimeError(f"Chromium did not write {pdf}")
