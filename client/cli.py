"""`medfed-site`: the hospital IT team's command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from client.config import SiteConfigError, load_site_config
from client.dicom import Preprocessing, SiteDataError
from client.dicom.preflight import default_labels, preflight, usable
from client.synth import DEFAULT_DIFFICULTY, generate_site, site_profile

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
    kind: Annotated[str, typer.Option(help="ct (chest CT slices, one binary label) or radiograph (frontal chest "
                                           "radiographs, findings nodule, effusion, cardiomegaly)")] = "ct",
) -> None:
    """Write a seeded synthetic hospital: chest-CT-like DICOM slices (or chest radiographs) and labels.csv."""
    if kind == "radiograph":
        from client.synth_radiograph import FINDINGS, generate_radiograph_site, radiograph_profile

        summary = generate_radiograph_site(out, radiograph_profile(site_index, patients=patients, difficulty=difficulty),
                                           seed=seed)
        what = f"with any of {', '.join(FINDINGS)}"
    elif kind == "ct":
        summary = generate_site(out, site_profile(site_index, patients=patients, difficulty=difficulty), seed=seed)
        what = "positive"
    else:
        err.print(f"[red]error:[/] --kind {kind!r}: use ct or radiograph")
        raise typer.Exit(EXIT_BAD_INPUT)
    err.print(f"wrote {summary.images} DICOM images of {summary.patients} patients "
              f"({summary.positives} {what}) to {out}; labels in {out / 'labels.csv'}")


@cli.command()
def budget(
    workspace: Annotated[Path, typer.Option(help="site workspace (holds site.toml and ledger.json)")],
    rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild ledger.json from the signed audit log "
                                                            "(after it was lost or rolled back)")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the site's privacy ledger: ε spent, budget, rounds left at the last round's cost."""
    from client.site_ledger import open_ledger
    from client.site_ledger import rebuild as rebuild_ledger
    from privacy.dp import auto_delta  # lazy: loads torch
    from privacy.files import atomic_write_bytes
    from privacy.ledger import LedgerCorruptError

    try:
        config = load_site_config(workspace)
        if rebuild:
            backup = config.ledger_file.with_suffix(".json.before-rebuild")
            if config.ledger_file.exists():
                atomic_write_bytes(backup, config.ledger_file.read_bytes(), mode=0o600)
            ledger, restored, unreadable = rebuild_ledger(config)
            err.print(f"rebuilt {config.ledger_file} from the audit log: {len(ledger.events)} event(s), "
                      f"{restored} restored")
            if unreadable:
                err.print(f"[yellow]warning:[/] the old ledger could not be read at all; it was rebuilt from the "
                          f"audit log only (the old file is kept as {backup} for review)")
        ledger = open_ledger(config)
    except (SiteConfigError, LedgerCorruptError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    policy = config.privacy
    delta = policy.delta or (ledger.events[-1].delta if ledger.events else auto_delta(1))
    summary = ledger.summary(delta=delta, max_epsilon=policy.max_epsilon, accountant=policy.accountant)
    if as_json:
        print(json.dumps(summary))
        return
    trained = sum(e.kind == "train" for e in ledger.events)
    err.print(f"site {config.name}: ε = {summary['epsilon']:.3f} of {policy.max_epsilon:g} "
              f"(δ = {delta:g}, {policy.accountant.upper()} accountant), {trained} rounds and "
              f"{len(ledger.events) - trained} metered evaluations recorded, about "
              f"{summary['remaining_rounds_estimate']} more rounds at the last round's cost")


@cli.command()
def check(
    data: Annotated[Path | None, typer.Option(help="folder of the DICOM export (default: the workspace's)")] = None,
    labels: Annotated[Path | None, typer.Option(help="labels CSV (default: DATA/labels.csv if present)")] = None,
    workspace: Annotated[Path | None, typer.Option(help="site workspace: use its data, labels and cache")] = None,
    workers: Annotated[int, typer.Option(min=0, help="decoding processes (0 = one per CPU, at most 8)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Preflight the DICOM export: usable images, skipped files and why, identifying tags (counts only)."""
    cache = keys = None
    pre = Preprocessing()
    try:
        if workspace is not None:
            config = load_site_config(workspace)
            data, labels, cache = data or config.dicom_dir, labels or config.labels_file, config.cache_dir
            keys = config.keys_dir
            pre = config.data.preprocessing(pre.image_size)
        if data is None:
            raise SiteDataError("pass --data DIR (the folder of the DICOM export) or --workspace DIR")
        report = preflight(data, labels or default_labels(data), pre, cache_dir=cache, keys_dir=keys, workers=workers,
                           progress=not as_json)
    except (SiteConfigError, SiteDataError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        print(json.dumps(report))
    else:
        _print_report(report)
    if not usable(report):
        raise typer.Exit(EXIT_BAD_INPUT)


def _print_report(r: dict[str, Any]) -> None:
    err.print(f"{r['files']} files: {r['images']} images ({r['frames']} frames) of {r['patients']} patients "
              f"in {r['studies']} studies; {len(r['skipped'])} skipped, {len(r['errors'])} errors "
              f"({r['seconds']:.1f} s, {r['decoded']} decoded)")
    err.print(f"labels: {r['labelled']} images labelled, {r['unlabelled']} without a label, "
              f"{r['labels_without_image']} labels without an image")
    err.print("modalities: " + ", ".join(f"{k} {v}" for k, v in r["modalities"].items()))
    err.print("transfer syntaxes: " + ", ".join(f"{k} {v}" for k, v in r["transfer_syntaxes"].items()))
    if r["phi_tags"] or r["burned_in"]:
        err.print("[yellow]identifying attributes present[/] (files per tag; values are never shown): "
                  + ", ".join(f"{k} {v}" for k, v in r["phi_tags"].items())
                  + f"; burned-in annotation: {r['burned_in']} files")
    else:
        err.print("no identifying attributes of the PS3.15 basic profile found")
    for kind in ("errors", "skipped"):
        for item in r[kind][:10]:
            err.print(f"  {kind[:-1] if kind == 'errors' else 'skipped'}: {item['path']}: {item['reason']}")
        if len(r[kind]) > 10:
            err.print(f"  ... and {len(r[kind]) - 10} more {kind} (see --json)")
    if not r["labelled"]:
        err.print("[red]no labelled, usable image[/]: check --labels and the data folder")


@cli.command("export-audit")
def export_audit(
    workspace: Annotated[Path, typer.Option(help="site workspace (holds audit.jsonl and keys/)")],
    out: Annotated[Path | None, typer.Option(help="file to write (default WORKSPACE/audit-export.json)")] = None,
) -> None:
    """Write a signed summary of the site's audit log for the central report (nothing identifying)."""
    from client.audit_trail import AUDIT_FILE, site_key_path
    from privacy.audit.export import ExportError, build_export
    from privacy.files import atomic_write_json
    from privacy.keys import KeyFileError, load_private_key

    try:
        config = load_site_config(workspace)
        log = config.workspace / AUDIT_FILE
        if not log.exists():
            raise SiteDataError(f"{log} does not exist: the site has not taken part in a run yet")
        export = build_export(log, config.name, load_private_key(site_key_path(config)))
    except (SiteConfigError, SiteDataError, ExportError, KeyFileError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    target = out or config.workspace / "audit-export.json"
    atomic_write_json(target, export)
    err.print(f"wrote {target}: {export['entries']} entries, head {export['head'][:16]}…, "
              f"{len(export['runs'])} run(s); send it to the central operator for the report")


@cli.command()
def init(
    workspace: Annotated[Path, typer.Option(help="site workspace to create")],
    server: Annotated[str, typer.Option(help="HOST:PORT of the federation's SuperLink")],
    ca: Annotated[Path, typer.Option(help="the federation CA certificate (from the central operator)")],
    data: Annotated[Path, typer.Option(help="folder of the site's DICOM export")],
    labels: Annotated[Path | None, typer.Option(help="labels CSV (default DATA/labels.csv)")] = None,
    name: Annotated[str | None, typer.Option(help="the site's name (default: the workspace folder's name)")] = None,
    roster_fingerprint: Annotated[str | None, typer.Option(help="the federation roster fingerprint from your "
                                                                "consortium (or later: medfed-site roster --expect)")] = None,
) -> None:
    """Create the site workspace (keys, trust anchor, policy), print the enrolment line, run the preflight."""
    from client.deploy import NODE_PUB, identity_fingerprint, init_site
    from client.roster import expect

    try:
        config = init_site(workspace, name=name or workspace.resolve().name, server=server, ca=ca, data=data,
                           labels=labels)
        if roster_fingerprint:
            expect(config, roster_fingerprint)
    except SiteConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    node_pub = config.workspace / NODE_PUB
    err.print(f"site workspace {config.workspace} created (policy in site.toml: max ε "
              f"{config.privacy.max_epsilon:g}, secure aggregation required)")
    err.print("send these two public files to the central operator, who runs:")
    print(f"medfed-server enroll --workspace SERVER_WORKSPACE {node_pub} --name {config.name} "
          f"--identity {node_pub.with_name('audit.pub')}")
    err.print(f"identity key sha256 {identity_fingerprint(config)} (compare it out of band)")
    try:
        report = preflight(config.dicom_dir, config.labels_file if config.labels_file.is_file() else None,
                           config.data.preprocessing(Preprocessing().image_size), cache_dir=config.cache_dir,
                           keys_dir=config.keys_dir)
    except SiteDataError as exc:
        err.print(f"[yellow]preflight:[/] {exc}")
        return
    _print_report(report)


@cli.command()
def start(
    workspace: Annotated[Path, typer.Option(help="site workspace")],
    runtime_port: Annotated[int, typer.Option(help="local port of the SuperNode's runtime API")] = 9094,
    print_systemd: Annotated[bool, typer.Option("--print-systemd")] = False,
) -> None:
    """Run the site in the foreground: its SuperNode (TLS pinned to the federation CA, node
    authentication, runs nothing itself) and the launcher that runs only approved code."""
    from client.deploy import launcher_command, supernode_command
    from privacy.bundle import installed_digest
    from privacy.services import offline_env, supervise, systemd_unit

    try:
        config = load_site_config(workspace)
    except SiteConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if print_systemd:
        print(systemd_unit(f"medfed site {config.name} (Flower SuperNode and the site's code-checking launcher)",
                           ["-m", "client.cli", "start", "--workspace", str(config.workspace), "--runtime-port",
                            str(runtime_port)], config.workspace))
        return
    err.print(f"site {config.name}: runs medfed {installed_digest()[:16]}… and the approved bundles "
              "(`medfed-site approvals`)")
    env = offline_env()
    raise typer.Exit(supervise({"supernode": (supernode_command(config, runtime_port), env),
                                "launcher": (launcher_command(config, runtime_port), env)}))


@cli.command()
def approve(
    digest: Annotated[str, typer.Argument(help="code digest of the bundle (64 hex), as the site's refusal printed it")],
    workspace: Annotated[Path, typer.Option(help="site workspace")],
    note: Annotated[str, typer.Option(help="why (kept beside the digest)")] = "",
    revoke: Annotated[bool, typer.Option("--revoke", help="remove the digest from the allow-list")] = False,
) -> None:
    """Allow this site to run an app bundle other than the medfed it installed (or --revoke it)."""
    from client.approvals import approve as add
    from client.approvals import revoke as remove

    try:
        config = load_site_config(workspace)
        if revoke:
            if not remove(config, digest):
                raise SiteConfigError(f"{digest} is not approved at this site")
            err.print(f"revoked {digest}")
            return
        add(config, digest, note=note)
    except SiteConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    err.print(f"approved {digest}: this site will run app bundles with this code digest")


@cli.command()
def approvals(
    workspace: Annotated[Path, typer.Option(help="site workspace")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The code this site runs: the installed medfed's digest and the approved bundles."""
    from client.approvals import approved
    from privacy.bundle import installed_digest

    try:
        config = load_site_config(workspace)
        listed = approved(config)
    except SiteConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    doc = {"installed": installed_digest(), "approved": list(listed.values())}
    if as_json:
        print(json.dumps(doc))
        return
    print(f"installed medfed: {doc['installed']} (always runs)")
    for e in listed.values():
        print(f"approved: {e['digest']}  since {e['approved_at']}  {e.get('note', '')}")
    if not listed:
        print("no other bundle approved")


@cli.command()
def roster(
    workspace: Annotated[Path, typer.Option(help="site workspace")],
    expect: Annotated[str | None, typer.Option(help="the roster fingerprint your consortium gave you out of band: "
                                                    "the first delivered roster that matches it is pinned")] = None,
    accept: Annotated[str | None, typer.Option("--accept", help="pin the changed roster waiting, if its fingerprint "
                                                                "is this one (compared with the consortium)")] = None,
) -> None:
    """Show the pinned federation roster's fingerprint (and a changed one waiting); --expect records the
    fingerprint to pin; --accept FINGERPRINT pins the waiting one."""
    from client.roster import EXPECTED, PENDING, PINNED, accept_pending
    from client.roster import expect as expect_fingerprint
    from privacy.secagg.wire import roster_fingerprint

    try:
        config = load_site_config(workspace)
        if expect:
            err.print(f"expecting roster {expect_fingerprint(config, expect)}: the first delivered roster with this "
                      "fingerprint will be pinned")
            return
        if accept:
            err.print(f"accepted: roster {accept_pending(config, accept)} is now pinned")
            return
    except (SiteConfigError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    for label, rel in (("pinned", PINNED), ("offered, waiting for --accept", PENDING)):
        path = config.workspace / rel
        if path.exists():
            sites = sorted(json.loads(path.read_text())["sites"])
            print(f"{label}: sha256 {roster_fingerprint(path.read_bytes())}  sites: {', '.join(sites)}")
    expected = config.workspace / EXPECTED
    if not (config.workspace / PINNED).exists():
        print(f"expected: {expected.read_text().strip()}" if expected.exists() else
              "no roster pinned and none expected: get the fingerprint from your consortium and run "
              f"`medfed-site roster --workspace {config.workspace} --expect FINGERPRINT`")


def main() -> None:
    """Console-script entry point: files it creates are the service account's only."""
    from privacy.errors import run_cli
    from privacy.files import private_files

    private_files()
    run_cli(cli, "medfed-site")


if __name__ == "__main__":
    main()
