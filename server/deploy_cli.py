"""`medfed-server init | enroll | sites | start | run`: the central server as a service."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from privacy.services import supervise, systemd_unit
from server.bundle import app_dir
from server.deploy import (
    EnrolError,
    enrol,
    flwr_env,
    new_run_dir,
    node_status,
    prepare_run_dir,
    run_command,
    server_services,
)
from server.pki import KeyExistsError, fingerprint
from server.workspace import WorkspaceError, init_workspace, load_workspace

err = Console(stderr=True, soft_wrap=True)
EXIT_BAD_INPUT = 2
Workspace = Annotated[Path, typer.Option(help="the server workspace")]


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/] {exc}")
    return typer.Exit(EXIT_BAD_INPUT)



def init(workspace: Workspace, host: Annotated[str, typer.Option(help="name or IP address sites connect to")],
         port: Annotated[int, typer.Option(min=1, max=65535, help="public HTTPS port (Fleet API only)")] = 8000,
         internal_port: Annotated[int, typer.Option(min=0, max=65535, help="the SuperLink's own port on "
                                                                           "127.0.0.1 (0 = PORT + 1)")] = 0,
         bind: Annotated[str, typer.Option(help="interface the public proxy listens on")] = "0.0.0.0") -> None:
    """Create the server workspace: CA, SuperLink TLS certificate, audit key, server.toml."""
    try:
        ws = init_workspace(workspace, host, port, internal_port=internal_port, bind=bind)
    except (WorkspaceError, KeyExistsError) as exc:
        raise _fail(exc) from None
    ca = ws.ca_cert.read_bytes()
    err.print(f"server workspace {ws.root}: sites connect to {ws.address} (Fleet API only); the SuperLink "
              f"answers on {ws.internal_address} (this host only)\n"
              f"give every site the CA certificate {ws.ca_cert}\n  (sha256 {fingerprint(ca)}: they compare it "
              "out of band)\nthen start the SuperLink: medfed-server start --workspace " + str(ws.root))

def enroll(workspace: Workspace, site_public_key: Annotated[Path, typer.Argument(help="the site's keys/node.pub")],
           name: Annotated[str, typer.Option(help="the site's name")],
           identity: Annotated[Path | None, typer.Option(help="the site's keys/audit.pub (default: beside "
                                                               "SITE_PUBLIC_KEY)")] = None) -> None:
    """Register a site with the SuperLink and record its identity key in the federation roster."""
    try:
        ws = load_workspace(workspace)
        record = enrol(ws, site_public_key, name, identity or site_public_key.with_name("audit.pub"))
    except (WorkspaceError, EnrolError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    err.print(f"enrolled {name}: node {record['node_id']}, identity key sha256 {record['identity_sha256']}; "
              f"roster sha256 {fingerprint(ws.roster.read_bytes())}")

def roster(workspace: Workspace, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The federation roster every run delivers (the enrolled identity keys) and its fingerprint,
    which each site's operator must obtain out of band and pin (`medfed-site roster --expect`)."""
    try:
        ws = load_workspace(workspace)
    except WorkspaceError as exc:
        raise _fail(exc) from None
    doc = {"sha256": fingerprint(ws.roster.read_bytes()), "sites": sorted(ws.enrolled())}
    if as_json:
        print(json.dumps(doc))
        return
    print(f"roster sha256 {doc['sha256']}  sites: {', '.join(doc['sites']) or 'none'}")

def sites(workspace: Workspace, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The enrolled sites and what the SuperLink last saw of each."""
    try:
        ws = load_workspace(workspace)
    except WorkspaceError as exc:
        raise _fail(exc) from None
    status = node_status(ws)
    rows = []
    for n, s in ws.enrolled().items():
        node = status.get(s["node_id"], {})
        state = str(node.get("status", "unknown (SuperLink not reachable)"))
        seen = node.get("offline-at") if state == "offline" else node.get("online-at")
        rows.append({"site": n, "node_id": s["node_id"], "enrolled_at": s["enrolled_at"], "status": state,
                     "last_seen": seen if seen not in (None, "N/A") else "never"})
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("site", "node", "enrolled", "status", "last seen")
    for r in rows:
        table.add_row(r["site"], r["node_id"], r["enrolled_at"], str(r["status"]), str(r["last_seen"]))
    err.print(table)

def start(workspace: Workspace, print_systemd: Annotated[bool, typer.Option("--print-systemd")] = False,
          print_firewall: Annotated[bool, typer.Option("--print-firewall", help="nftables rules that keep every "
                                                       "other local account off the SuperLink's port")] = False) -> None:
    """Run the central server in the foreground: the SuperLink on 127.0.0.1 (TLS, SuperNode
    authentication, persisted state), the SuperExec that runs ServerApps, and nginx on the public
    address passing only the Fleet API. One stops, all stop."""
    try:
        ws = load_workspace(workspace)
        services = server_services(ws)
    except (WorkspaceError, KeyExistsError) as exc:
        raise _fail(exc) from None
    if print_firewall:
        from server.proxy import firewall_rules

        print(firewall_rules(ws, os.getuid()))
        return
    if print_systemd:
        print(systemd_unit("medfed central server (SuperLink, SuperExec, Fleet API proxy)",
                           ["-m", "server.cli", "start", "--workspace", str(ws.root)], ws.root))
        return
    err.print(f"public (Fleet API only): https://{ws.address}  ·  SuperLink, Control and Runtime APIs: "
              f"https://{ws.internal_address} (this host only)")
    raise typer.Exit(supervise(services))

def run(workspace: Workspace, rounds: Annotated[int, typer.Option(min=1)] = 3,
        out: Annotated[Path | None, typer.Option(help="run directory (default WORKSPACE/runs/<time>)")] = None,
        local_steps: Annotated[int, typer.Option(min=1)] = 50, batch_size: Annotated[int, typer.Option(min=1)] = 64,
        min_sites: Annotated[int, typer.Option(min=0, help="sites to wait for (0 = all enrolled)")] = 0,
        no_secagg: Annotated[bool, typer.Option("--no-secagg")] = False,
        round_timeout: Annotated[float, typer.Option(min=1.0)] = 600.0,
        resume: Annotated[Path | None, typer.Option(help="continue a run that stopped or crashed (a server restart) "
                                                         "in this run directory, with its own config; the other "
                                                         "options are ignored")] = None) -> None:
    """Submit a training run to the SuperLink, stream it, and leave the run directory."""
    try:
        ws = load_workspace(workspace)
    except WorkspaceError as exc:
        raise _fail(exc) from None
    enrolled = ws.enrolled()
    if not enrolled:
        raise _fail(WorkspaceError("no site is enrolled: `medfed-server enroll` first"))
    if resume is not None:
        run_dir, config = resume.resolve(), _resume_config(resume.resolve())
    else:
        run_dir = (out or new_run_dir(ws)).resolve()
        prepare_run_dir(ws, run_dir)
        config = {
            "num-server-rounds": rounds, "local-steps": local_steps, "batch-size": batch_size,
            "min-sites": min_sites or len(enrolled), "round-timeout": round_timeout, "run-dir": str(run_dir),
            "audit-key": str(ws.audit_key), "roster-file": str(ws.roster), "secure-aggregation": not no_secagg,
        }
    started = time.monotonic()
    with app_dir() as (app, digest):  # exactly the medfed installed here, which sites compare with theirs
        err.print(f"submitting medfed (code digest {digest[:16]}…) to the SuperLink")
        proc = subprocess.run(run_command(app, config), env=flwr_env(ws), check=False)
    metrics = run_dir / "metrics.json"
    if not _finished(metrics):
        err.print(f"[red]error:[/] the run did not finish (flwr exit {proc.returncode}); see the SuperLink log")
        raise typer.Exit(1)
    from privacy.audit.report import write_report
    from privacy.audit.trust import from_roster
    from server.console import round_table

    # the operator's view: its own roster's keys, and no site log (sites keep theirs; an auditor adds them)
    report, built = write_report(run_dir, from_roster(ws.roster), server_only=True)
    err.print(round_table(json.loads(metrics.read_text())["rounds"], len(enrolled)))
    verdict = "verified" if built.verdict.ok else f"[red]FAILED: {built.verdict.problems[0]}[/]"
    err.print(f"audit logs (server's only): {verdict}; report: {report}\nrun directory: {run_dir} "
              f"({time.monotonic() - started:.0f} s)\nan auditor verifies it with the sites' logs: medfed-audit "
              f"verify {run_dir} SITE_WORKSPACE... --roster-fingerprint {fingerprint(ws.roster.read_bytes())}")


COMMANDS = (init, enroll, roster, sites, start, run)


def register(cli: typer.Typer) -> None:
    """Add the deployment commands to ``medfed-server``."""
    for command in COMMANDS:
        cli.command()(command)


def _resume_config(run_dir: Path) -> dict[str, Any]:
    """The run-config of ``run --resume``: the run directory and the instruction; the ServerApp reads
    everything else from the run's own metrics.json and signed log. Checked here first, so a run
    that cannot be resumed is refused before anything is submitted."""
    from server.config import RESUME_KEY
    from server.resume import ResumeError, ResumeIntegrityError, resume_point, run_lock

    try:
        with run_lock(run_dir, wait=0.0):
            point = resume_point(run_dir)
    except ResumeIntegrityError:
        raise  # damaged evidence: exit 4 (privacy.errors.run_cli)
    except (ResumeError, OSError, ValueError, KeyError) as exc:
        raise _fail(exc) from None
    err.print(f"resuming {run_dir}: run {point.run_id}, rounds {point.next_round}..{point.config.num_server_rounds} "
              f"from the model after round {point.last_round}"
              + (f"; round {point.abandoned} was cut short and is not repeated" if point.abandoned else ""))
    return {"run-dir": str(run_dir), RESUME_KEY: True}


def _finished(metrics: Path, wait: float = 60.0) -> bool:
    """The ServerApp writes metrics.json last; wait briefly for it after ``flwr run`` returns (a
    run directory left by a stop has a final model too, and ``stopped``)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            m = json.loads(metrics.read_text())
            if "final_model_sha256" in m and "stopped" not in m:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    return False
