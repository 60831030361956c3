"""`medfed-audit`: verify signed audit logs and build the compliance report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from privacy.audit.crosscheck import load_metrics
from privacy.audit.report import html_to_pdf, write_report
from privacy.audit.trust import TrustError, resolve
from privacy.audit.verify import Verdict, run_logs, segment_files, verify_paths

cli = typer.Typer(help="medfed audit: verify signed logs, build the compliance report.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)
EXIT_BAD_INPUT = 2


@cli.callback()
def _commands() -> None:
    """medfed audit: verify signed logs, build the compliance report."""


def collect(paths: list[Path]) -> tuple[dict[str, list[Path]], list[Path], dict[str, Any] | None]:
    """Logs by actor, the run directories and the run's metrics, from run dirs, workspaces or log files."""
    logs: dict[str, list[Path]] = {}
    metrics = None
    run_dirs: list[Path] = []
    for path in paths:
        if path.is_dir() and (path / "metrics.json").is_file():
            logs |= run_logs(path)
            metrics = load_metrics(path / "metrics.json")
            run_dirs.append(path)
        elif path.is_dir() and (path / "audit.jsonl").exists():
            files = segment_files(path / "audit.jsonl")
            logs[_first_actor(files) or path.name] = files
        elif path.is_file():
            files = segment_files(path)
            logs[_first_actor(files) or path.stem] = files
        else:
            raise FileNotFoundError(f"{path}: not a run directory, a workspace with audit.jsonl, or a log file")
    return logs, run_dirs, metrics


def _first_actor(files: list[Path]) -> str | None:
    for f in files:
        first = f.read_bytes().split(b"\n", 1)[0]
        try:
            return str(json.loads(first)["actor"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


RosterOpt = Annotated[Path | None, typer.Option(
    "--roster", help="a federation roster you trust: your site's pinned SITE/trust/roster.json (the sites' identity "
                     "keys and the server's audit key)")]
FingerprintOpt = Annotated[str | None, typer.Option(
    "--roster-fingerprint", help="the roster fingerprint your consortium gave you out of band; the roster (--roster, "
                                 "or RUN_DIR/keys/roster.json) must hash to it")]
KeysOpt = Annotated[Path | None, typer.Option(help="a folder of <actor>.pub public keys you obtained out of band")]
TrustRunKeysOpt = Annotated[bool, typer.Option(
    "--trust-run-keys", help="use the keys found in the run directory (NOT out of band: an operator who can edit the "
                             "logs can replace them)")]
ServerOnlyOpt = Annotated[bool, typer.Option(
    "--server-only", help="verify the server's log without the sites' logs (the report says so)")]
AllowMissingOpt = Annotated[list[str] | None, typer.Option(
    "--allow-missing", help="a site the server names whose log you do not hold (repeatable; listed as not checked)")]


@cli.command()
def verify(
    paths: Annotated[list[Path], typer.Argument(help="run directories, site workspaces or audit log files")],
    roster: RosterOpt = None,
    roster_fingerprint: FingerprintOpt = None,
    keys: KeysOpt = None,
    trust_run_keys: TrustRunKeysOpt = False,
    server_only: ServerOnlyOpt = False,
    allow_missing: AllowMissingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Check every chain, signature and sequence with out-of-band keys; cross-check server and
    site logs of a run (counter-signed heads, model hashes, ε) and metrics.json against the log."""
    try:
        logs, run_dirs, metrics = collect(paths)
        trust = resolve(run_dirs, roster=roster, roster_fingerprint=roster_fingerprint, keys=keys,
                        trust_run_keys=trust_run_keys)
    except (FileNotFoundError, TrustError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    verdict = verify_paths(logs, trust, metrics, server_only=server_only, allow_missing=allow_missing or ())
    if as_json:
        print(json.dumps(verdict.to_json()))
    else:
        _print(verdict)
    raise typer.Exit(0 if verdict.ok else 1)


def _print(verdict: Verdict) -> None:
    err.print(f"keys: {verdict.trust}")
    for actor, chain in verdict.chains.items():
        torn = " (incomplete last line from an interrupted append: ignored)" if chain.torn_tail else ""
        err.print(f"{actor}: {len(chain.entries)} entries, head {chain.head[:16]}…{torn}")
    if verdict.unchecked:
        err.print(f"[yellow]not cross-checked[/] (their logs were not given; pass their workspaces or exports): "
                  f"{', '.join(verdict.unchecked)}")
    if verdict.ok:
        sites = [a for a in verdict.checked if a != "server"]
        agree = f"server and site logs agree ({', '.join(sites)})" if sites else "NO site log checked (--server-only)"
        err.print(f"[green]verified[/]: every chain, signature and sequence holds; {agree}"
                  + ("; metrics.json is what the server's log signed" if verdict.metrics_checked else ""))
    else:
        err.print(f"[red]FAILED[/]: {verdict.problems[0]}")
        for p in verdict.problems[1:10]:
            err.print(f"  also: {p}")


@cli.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="the run directory (metrics.json, audit.jsonl)")],
    site_logs: Annotated[list[Path] | None, typer.Option("--site-logs", help="a site workspace or a folder of "
                                                          "signed site exports (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default RUN_DIR/report.html)")] = None,
    pdf: Annotated[bool, typer.Option("--pdf", help="also print it to a PDF beside the HTML (needs Chromium)")] = False,
    roster: RosterOpt = None,
    roster_fingerprint: FingerprintOpt = None,
    keys: KeysOpt = None,
    trust_run_keys: TrustRunKeysOpt = False,
    server_only: ServerOnlyOpt = False,
    allow_missing: AllowMissingOpt = None,
) -> None:
    """Build the compliance report: verdict, participants, curves, privacy, protection, fingerprints, hashes."""
    try:
        trust = resolve([run_dir], roster=roster, roster_fingerprint=roster_fingerprint, keys=keys,
                        trust_run_keys=trust_run_keys)
        path, data = write_report(run_dir, trust, out, site_logs or [], server_only=server_only,
                                  allow_missing=allow_missing or ())
    except (FileNotFoundError, TrustError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    err.print(f"report: {path} ({'verified' if data.verdict.ok else 'VERIFICATION FAILED'})")
    if pdf:
        try:
            html_to_pdf(path, path.with_suffix(".pdf"))
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        err.print(f"pdf: {path.with_suffix('.pdf')}")


def main() -> None:
    """Console-script entry point: files it creates are the service account's only."""
    from privacy.errors import run_cli
    from privacy.files import private_files

    private_files()
    run_cli(cli, "medfed-audit")


if __name__ == "__main__":
    main()
