"""`medfed-site`: the hospital IT team's command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from client.config import SiteConfigError, load_site_config
from client.synth import DEFAULT_DIFFICULTY, generate_site, site_profile
from privacy.dp import auto_delta
from privacy.ledger import LedgerCorruptError, PrivacyLedger

cli = typer.Typer(help="medfed site: data, privacy budget and the site's training node.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)
EXIT_BAD_INPUT = 2


@cli.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder to write the synthetic hospital into")],
    patients: Annotated[int, typer.Option(min=1, help="number of patients")] = 100,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 0,
    site_index: Annotated[int, typer.Option(min=0, help="which hospital profile (scanner, storage, prevalence)")] = 0,
    difficulty: Annotated[float, typer.Option(min=0.05, help="higher = fainter lesions")] = DEFAULT_DIFFICULTY,
) -> None:
    """Write a seeded synthetic hospital: chest-CT-like DICOM slices and labels.csv."""
    summary = generate_site(out, site_profile(site_index, patients=patients, difficulty=difficulty), seed=seed)
    err.print(f"wrote {summary.images} DICOM images of {summary.patients} patients "
              f"({summary.positives} positive) to {out}; labels in {out / 'labels.csv'}")


@cli.command()
def budget(
    workspace: Annotated[Path, typer.Option(help="site workspace (holds site.toml and ledger.json)")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the site's privacy ledger: ε spent, budget, rounds left at the last round's cost."""
    try:
        config = load_site_config(workspace)
        ledger = PrivacyLedger.load(config.ledger_file)
    except (SiteConfigError, LedgerCorruptError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    policy = config.privacy
    delta = policy.delta or (ledger.events[-1].delta if ledger.events else auto_delta(1))
    summary = ledger.summary(delta=delta, max_epsilon=policy.max_epsilon, accountant=policy.accountant)
    if as_json:
        print(json.dumps(summary))
        return
    err.print(f"site {config.name}: ε = {summary['epsilon']:.3f} of {policy.max_epsilon:g} "
              f"(δ = {delta:g}, {policy.accountant.upper()} accountant), {len(ledger.events)} rounds "
              f"recorded, about {summary['remaining_rounds_estimate']} more at the last round's cost")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="medfed-site")


if __name__ == "__main__":
    main()
