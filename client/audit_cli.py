"""`medfed-audit` as installed: the audit commands of ``privacy.audit.cli`` plus ``attack``, which
runs at a site (it needs the site's data, so it lives on the client side of the import arrows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from client.config import SiteConfigError, load_site_config
from client.dicom import SiteDataError
from privacy.attacks.result import KINDS, AttackResultError
from privacy.audit.cli import EXIT_BAD_INPUT, cli, err


@cli.command()
def attack(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory (metrics.json, model-final.npz)")],
    site: Annotated[str, typer.Option(help="the site that attacks its own patients")],
    workspace: Annotated[Path, typer.Option(help="the site's own workspace (never one inside RUN_DIR: the server "
                                                 "wrote that directory)")],
    kind: Annotated[str, typer.Option(help="membership, inversion, canary or all")] = "all",
    references: Annotated[int, typer.Option(min=0, help="reference models of the calibrated membership attack "
                                                        "(0: the loss attack only)")] = 4,
    reference_steps: Annotated[int, typer.Option(min=0, help="training steps of each reference model (0: the run's "
                                                             "rounds × local steps)")] = 0,
    iterations: Annotated[int, typer.Option(min=0, help="gradient inversion iterations (0: the default)")] = 0,
    seed: Annotated[int | None, typer.Option(help="seed the attacks' randomness (reproducible research)")] = None,
    simulation: Annotated[bool, typer.Option("--simulation", help="RUN_DIR is a simulation run on this machine and "
                                                                  "the workspace one of its virtual sites "
                                                                  "(RUN_DIR/sites/SITE); never for a real site")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Attack what this site shared in a run, at the site: membership inference against the final
    model, gradient inversion of the update it would send, the canary audit of its ε. The result
    (numbers only) is written to WORKSPACE/audit/attacks/RUN_ID.json; image grids stay beside it."""
    from client.attacks import run_attacks

    kinds = KINDS if kind == "all" else (kind,)
    try:
        if kind != "all" and kind not in KINDS:
            raise ValueError(f"--kind {kind!r}: use one of {', '.join(KINDS)} or all")
        config = load_site_config(workspace)
        if config.name != site:
            raise ValueError(f"--site {site!r} but the workspace {config.workspace} is site {config.name!r}")
        result = run_attacks(config, Path(run_dir), kinds=kinds, references=references,
                             reference_steps=reference_steps, inversion_iterations=iterations, seed=seed,
                             simulated=simulation)
    except (FileNotFoundError, ValueError, SiteConfigError, SiteDataError, AttackResultError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        print(json.dumps(result))
        return
    for line in summary_lines(result):
        err.print(line)
    err.print(f"written: {config.workspace / 'audit' / 'attacks' / (result['run_id'] + '.json')}")


def summary_lines(result: dict) -> list[str]:
    """A few lines a privacy officer reads (utility beside every attack figure)."""
    u = result.get("utility", {})
    lines = [f"site {result['site']}, run {result['run_id']}: validation AUROC {_f(u.get('val_auroc'))}"]
    for name, sep in (result.get("membership") or {}).items():
        if isinstance(sep, dict):
            lines.append(f"membership ({name}): AUROC {_f(sep['auroc'])}, TPR {_f(sep['tpr_at_1pct_fpr'])} at 1% FPR, "
                         f"{_f(sep['tpr_at_01pct_fpr'])} at 0.1% FPR ({sep['members']} members, "
                         f"{sep['non_members']} non-members)")
    for name, rec in (result.get("inversion") or {}).items():
        if isinstance(rec, dict):
            lines.append(f"inversion ({name}): SSIM {_f(rec.get('ssim'))}, PSNR {_f(rec.get('psnr'), 1)} dB")
    c = result.get("canary")
    if c:
        lines.append(f"canary audit: ε ≥ {_f(c['epsilon_lower_bound'])} ({c['confidence']:.0%} confidence; "
                     f"{c['correct']}/{c['guesses']} right on {c['canaries']} canaries); accountant ε "
                     f"{_f(c['accountant_epsilon'])}" + ("" if c["within_accountant"] else "  [red]EXCEEDED[/]"))
    return lines


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main() -> None:
    """Console-script entry point (files it creates are the service account's only)."""
    from privacy.audit.cli import main as audit_main

    audit_main()


if __name__ == "__main__":
    main()
