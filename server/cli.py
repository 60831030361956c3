"""`medfed-server`: the central operator's command (simulate; init, enroll, sites, start, run)."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from client.config import PrivacyPolicy, SiteConfig, SiteConfigError
from client.dicom import SiteDataError
from privacy.audit.report import write_report
from server.config import RunConfig, RunConfigError
from server.console import fmt, round_table
from server.deploy_cli import register as register_deployment
from server.runtime import warm_runtime
from server.stop import Supervisor

cli = typer.Typer(help="medfed central server: simulate federations, run training.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT = 2
INPUT_ERRORS = (SiteDataError, SiteConfigError, RunConfigError, FileNotFoundError, ValueError)


@cli.callback()
def _root() -> None:
    """medfed central server."""


@cli.command()
def simulate(
    sites: Annotated[int, typer.Option(min=1, help="number of virtual hospitals")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="federated rounds")] = 3,
    out: Annotated[Path, typer.Option(help="run directory to create")] = Path("runs/demo"),
    keys_dir: Annotated[Path | None, typer.Option(help="the private keys of the server and the virtual sites "
                                                       "(default OUT.keys, beside the run directory, never in it)")] = None,
    patients: Annotated[int | None, typer.Option(min=4, help="patients per generated site")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="existing site folder (DICOM + labels.csv); once per site")] = None,
    sites_dir: Annotated[Path | None, typer.Option(help="reuse the site workspaces of an earlier run (OLD_RUN/sites)")] = None,
    kind: Annotated[str, typer.Option(help="generated sites: ct (chest CT slices, binary nodule label) or radiograph "
                                             "(chest radiographs, findings nodule, effusion, cardiomegaly)")] = "ct",
    difficulty: Annotated[float, typer.Option(min=0.05, help="generated sites: higher = fainter findings")] = 1.0,
    model: Annotated[str, typer.Option(help="network: slicenet, densenet121, resnet18, resnet34, resnet50, "
                                            "efficientnet-b0, or an installed factory package.module:function")]
    = RunConfig.model,
    size: Annotated[int, typer.Option(min=8, max=1024, help="input size in pixels (images are resized to size²)")]
    = RunConfig.image_size,
    findings: Annotated[str | None, typer.Option(help="multi-label: the labels.csv columns, comma-separated "
                                                      "(default: one binary 'label'; --kind radiograph: its three)")]
    = None,
    window: Annotated[str, typer.Option(help="VOI window 'center,width' for every site's images (e.g. CT lung "
                                             "'-600,1500'), or up to 4 separated by ';' (one input channel each); "
                                             "default: the site's own, else each file's")] = "",
    init_weights: Annotated[Path | None, typer.Option(help="start from these local weights (.npz or .safetensors "
                                                           "state_dict; sha256 in the audit log)")] = None,
    local_steps: Annotated[int, typer.Option(min=1)] = RunConfig.local_steps,
    batch_size: Annotated[int, typer.Option(min=1)] = RunConfig.batch_size,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = RunConfig.learning_rate,
    optimizer: Annotated[str, typer.Option(help="the sites' local optimizer: adam, or sgd (momentum 0.9)")]
    = RunConfig.optimizer,
    val_share: Annotated[float | None, typer.Option(help="each virtual site's share of patients held out for "
                                                         "validation, the membership attack's non-members "
                                                         "(default 0.2)")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help=f"virtual sites' DP clipping norm per patient "
                                                             f"(default {PrivacyPolicy.max_grad_norm:g})")] = None,
    epsilon: Annotated[float | None, typer.Option(help=f"virtual sites' privacy budget (max ε; default "
                                                       f"{PrivacyPolicy.max_epsilon:g}; given, it applies to "
                                                       "--sites-dir sites too)")] = None,
    delta: Annotated[float, typer.Option(help="virtual sites' δ (0 = below 1/patients)")] = 0.0,
    accountant: Annotated[str, typer.Option(help="virtual sites' accountant: rdp or prv")] = "rdp",
    noise_multiplier: Annotated[float, typer.Option(min=0.0, help="minimum noise the server asks for (sites may use more)")] = 0.0,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="train WITHOUT differential privacy (comparison only)")] = False,
    no_secagg: Annotated[bool, typer.Option("--no-secagg", help="send updates UNMASKED (comparison only)")] = False,
    secagg_k: Annotated[int, typer.Option(min=0, help="SecAgg+ neighbourhood size (odd; 0 = default: every site up to "
                                                      "64 sites, which sites require at that scale)")] = 0,
    secagg_threshold: Annotated[int, typer.Option(min=0, help="SecAgg+ Shamir threshold (0 = majority)")] = 0,
    secagg_colluders: Annotated[int, typer.Option(min=0, help="SecAgg+: colluding sites the rounds are sized for "
                                                              "(raises the threshold; a site assuming more refuses)")] = 0,
    seed: Annotated[int, typer.Option(help="seeds the generated data and the initial model (never the sites' noise)")] = 0,
    metrics_release: Annotated[str, typer.Option(
        "--metrics", help="how virtual sites release validation metrics: exact (synthetic data), dp (noisy, charged "
                          "to the ledger, as hospitals do) or none")] = "exact",
    site_seed: Annotated[int | None, typer.Option(help="virtual sites draw DETERMINISTIC noise from this seed "
                                                       "(reproducible research; warned and audited)")] = None,
    aggregator: Annotated[str, typer.Option(help="mean, or (needs --no-secagg) median, trimmed-mean or krum")]
    = RunConfig.aggregator,
    update_norm_bound: Annotated[float, typer.Option(min=0.0, help="L2 bound on a site's update: each is clipped to it "
                                                                   "(in the clear), or a secure aggregate above it "
                                                                   "is rejected; 0 = none")] = 0.0,
    poison: Annotated[list[str] | None, typer.Option(help="chaos: SITE:scale=FACTOR (the site sends its update "
                                                          "times FACTOR) or SITE:flip-labels; repeatable")] = None,
    fail: Annotated[list[str] | None, typer.Option(help="chaos: SITE:ROUND:STAGE kills a virtual site in that round at "
                                                        "STAGE: advertise, reveal (above 64 sites), share, input, "
                                                        "train, reply, consistency or unmask (docs/robustness.md); "
                                                        "repeatable")] = None,
    privacy_audit: Annotated[bool, typer.Option("--privacy-audit", help="plant canaries at --audit-site, and after "
                                                "training run the membership, inversion and canary attacks there; "
                                                "the report's 'Empirical privacy audit' shows them")] = False,
    audit_site: Annotated[str, typer.Option(help="the site --privacy-audit attacks")] = "site-1",
    canary_site: Annotated[str, typer.Option(help="the site whose canaries --privacy-audit plants and audits "
                                                  "(default: --audit-site; another site keeps them out of the "
                                                  "membership attack's training set)")] = "",
    canaries: Annotated[int, typer.Option(min=2, help="canary patients --privacy-audit plants")] = 64,
    resume: Annotated[Path | None, typer.Option(help="continue a stopped or crashed simulation in this run directory "
                                                     "(its config, sites and keys; other options are ignored)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the final metrics as JSON")] = False,
    verbose: Annotated[bool, typer.Option(help="show Flower and Ray logs")] = False,
) -> None:
    """Generate (or reuse) virtual hospitals and train across them in Flower's simulation runtime.

    SIGINT (Ctrl-C) or SIGTERM stops the run within seconds: the round in progress is abandoned,
    model-final.npz holds the model after the last applied round, and ``--resume OUT`` continues."""
    if resume is not None:
        _resume(resume, verbose=verbose, as_json=as_json)
        return
    with Supervisor(functools.partial(warm_runtime, verbose)) as runtime:  # Ray starts while the sites are prepared
        from client.synth_radiograph import FINDINGS as RADIOGRAPH_FINDINGS
        from privacy.protocol import parse_findings, parse_windows
        from privacy.secagg.wire import roster_fingerprint
        from server.audit_trail import SERVER_KEY
        from server.chaos import parse_failure, parse_poison
        from server.initial_model import initial_model
        from server.rundir import private_keys_dir
        from server.simulate import KEYS_DIR, ROSTER_FILE, SimulationPlan, SimulationRecord, prepare_sites

        _warn(no_dp=no_dp, exact_metrics=metrics_release == "exact", site_seed=site_seed, no_secagg=no_secagg)
        try:
            # given on the command line, these also apply to reused --sites-dir sites (their own policy otherwise)
            given = tuple((k, v) for k, v in (("dp", False if no_dp else None), ("max_epsilon", epsilon),
                                              ("max_grad_norm", max_grad_norm)) if v is not None)
            policy = replace(PrivacyPolicy(delta=delta, accountant=accountant, require_secure_aggregation=not no_secagg,
                                           metrics=metrics_release, seed=site_seed), **dict(given))
            poisons = tuple(parse_poison(p) for p in poison or ())
            failures = tuple(parse_failure(f) for f in fail or ())
            if findings is None:
                findings = ",".join(RADIOGRAPH_FINDINGS) if kind == "radiograph" and not (data or sites_dir) else ""
            cfg = RunConfig(num_server_rounds=rounds, local_steps=local_steps, batch_size=batch_size, model=model,
                            image_size=size, findings=findings, window=window, aggregator=aggregator,
                            update_norm_bound=update_norm_bound,
                            init_weights=str(init_weights.resolve()) if init_weights else "",
                            learning_rate=learning_rate, optimizer=optimizer, run_dir=str(out.resolve()), seed=seed,
                            dp=not no_dp,
                            noise_multiplier=noise_multiplier, secure_aggregation=not no_secagg, secagg_k=secagg_k,
                            secagg_threshold=secagg_threshold, secagg_colluders=secagg_colluders,
                            roster_file=str((out / KEYS_DIR / ROSTER_FILE).resolve()),
                            audit_key=str((keys_dir or private_keys_dir(out)).resolve() / SERVER_KEY))
            plan = SimulationPlan(sites=sites, patients=patients, data=tuple(data or ()),
                                  sites_dir=sites_dir, data_seed=seed, policy=policy, kind=kind, difficulty=difficulty,
                                  poisons=poisons, failures=failures, val_share=val_share, reuse_privacy=given,
                                  canaries=canaries if privacy_audit else 0,
                                  audit_site=audit_site if privacy_audit else "",
                                  canary_site=canary_site if privacy_audit else "")
            if cfg.init_weights:
                initial_model(cfg)  # a file that does not fit the network fails here, before any site is prepared
            with err.status("preparing site workspaces (generating DICOM, warming caches)…"):
                configs = prepare_sites(out, plan, cfg.image_size, keys_dir, findings=parse_findings(cfg.findings),
                                        windows=parse_windows(cfg.window))
            fingerprint = roster_fingerprint((out / KEYS_DIR / ROSTER_FILE).read_bytes())  # kept from before the run
            if len(configs) < 2 and cfg.secure_aggregation:
                raise ValueError("secure aggregation needs at least 2 sites: use --sites 2 or more, or --no-secagg")
            SimulationRecord(workspaces=tuple(str(c.workspace) for c in configs), roster_fingerprint=fingerprint,
                             sites_dir=str(sites_dir.resolve()) if sites_dir else "",
                             keys_dir=str(keys_dir.resolve()) if keys_dir else "", poisons=tuple(poison or ()),
                             failures=tuple(fail or ()), privacy_audit=plan.audit_site, canary_site=plan.canary_site).write(out)
        except INPUT_ERRORS as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None

        metrics = _train(cfg, configs, verbose=verbose, poisons=plan.poisons, failures=plan.failures, runtime=runtime)
    _privacy_audit(out, configs, plan.audit_site, plan.canaries_at, metrics)
    _finish(out, configs, fingerprint, sites_dir=sites_dir, keys_dir=keys_dir, as_json=as_json)
    _exit_if_stopped(out, metrics)


def _resume(out: Path, *, verbose: bool, as_json: bool) -> None:
    """``simulate --resume OUT``: the same sites, config and keys, from the run's next round."""
    from client.config import load_site_config
    from server.chaos import parse_failure, parse_poison
    from server.resume import ResumeError, ResumeIntegrityError, resume_point
    from server.simulate import SimulationRecord

    out = out.resolve()
    try:
        record = SimulationRecord.read(out)
        cfg = RunConfig(**json.loads((out / "metrics.json").read_text())["config"])
        point = resume_point(out)  # refuses a finished run or a damaged log, before Ray starts
        configs = [load_site_config(Path(w)) for w in record.workspaces]
        poisons = tuple(parse_poison(p) for p in record.poisons)
        failures = tuple(parse_failure(f) for f in record.failures)
    except ResumeIntegrityError:
        raise  # damaged evidence: exit 4 (privacy.errors.run_cli), never "bad input"
    except (*INPUT_ERRORS, ResumeError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    left = cfg.num_server_rounds - point.next_round + 1
    err.print(f"resuming {out}: run {point.run_id}, rounds {point.next_round}..{cfg.num_server_rounds} ({max(left, 0)} "
              f"left) from the model after round {point.last_round}"
              + (f"; round {point.abandoned} was cut short and is not repeated" if point.abandoned else ""))
    with Supervisor(functools.partial(warm_runtime, verbose)) as runtime:
        metrics = _train(cfg, configs, verbose=verbose, poisons=poisons, resume=True, done=point.next_round - 1,
                         failures=failures, runtime=runtime)
    _privacy_audit(out, configs, record.privacy_audit, record.canary_site or record.privacy_audit, metrics)
    _finish(out, configs, record.roster_fingerprint, sites_dir=Path(record.sites_dir) if record.sites_dir else None,
            keys_dir=Path(record.keys_dir) if record.keys_dir else None, as_json=as_json)
    _exit_if_stopped(out, metrics)


def _privacy_audit(out: Path, configs: list[SiteConfig], site: str, canary_site: str, metrics: dict[str, Any]) -> None:
    """``--privacy-audit``: the audited virtual site (and the canary site, when another) attacks the
    finished run at home; the numbers go to RUN_DIR/attacks.json for the report (a real site keeps
    them: ``medfed-audit attack``)."""
    if not site or metrics.get("stopped"):
        return
    from client.attacks import run_attacks
    from client.audit_cli import summary_lines
    from privacy.attacks.result import KINDS
    from privacy.files import atomic_write_json

    plan = {site: KINDS} if canary_site == site else {site: ("membership", "inversion"), canary_site: ("canary",)}
    results = {}
    for name, kinds in plan.items():
        config = next(c for c in configs if c.name == name)
        try:
            with err.status(f"privacy audit at {name}: {', '.join(kinds)}…"):
                results[name] = run_attacks(config, out, kinds=kinds, simulated=True)
        except INPUT_ERRORS as exc:  # the run stands; its report says what is not recorded
            err.print(f"[red]privacy audit failed at {name}:[/] {exc}")
            continue
        for line in summary_lines(results[name]):
            err.print(line)
    if results:
        atomic_write_json(out / "attacks.json", {"sites": results})


def _exit_if_stopped(out: Path, metrics: dict[str, Any]) -> None:
    """A run stopped by a signal says so and exits 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""
    import signal

    stopped = metrics.get("stopped")
    if not stopped:
        return
    err.print(f"[yellow]stopped by {stopped['reason']} after round {stopped['after_round']}[/]"
              + (f" (round {stopped['abandoned']} abandoned)" if stopped.get("abandoned") else "")
              + f"; model-final.npz is that round's model. Continue: medfed-server simulate --resume {out}")
    code = getattr(signal.Signals, str(stopped["reason"]), None) if str(stopped["reason"]).startswith("SIG") else None
    raise typer.Exit(128 + int(code) if code is not None else 1)


def _warn(*, no_dp: bool, exact_metrics: bool, site_seed: int | None, no_secagg: bool) -> None:
    """Say what each comparison flag gives up, before anything runs."""
    if no_dp:
        err.print("[bold red]WARNING: --no-dp: sites train WITHOUT differential privacy. "
                  "Released models can leak patient data. Use only to measure DP's cost.[/]")
    if exact_metrics and not no_dp:
        err.print("note: virtual sites release EXACT validation metrics (generated data); hospitals meter them "
                  "(--metrics dp: noisy, charged to each site's ledger)")
    if site_seed is not None:
        err.print("[bold yellow]WARNING: --site-seed: the virtual sites' DP noise is reproducible from the seed "
                  "(research only; recorded in their audit logs).[/]")
    if no_secagg:
        err.print("[bold red]WARNING: --no-secagg: the server sees every site's update in the clear. "
                  "Gradient inversion can turn an update back into patient images. Comparison only.[/]")


def _train(cfg: RunConfig, configs: list[SiteConfig], *, verbose: bool, runtime: Supervisor, poisons: tuple = (),
           resume: bool = False, done: int = 0, failures: tuple = ()) -> dict[str, Any]:
    """Run the simulation in ``runtime``'s child process (``server.stop.Supervisor``: SIGINT/SIGTERM
    stop it cleanly). Returns metrics.json as the run left it."""

    def on_signal(name: str) -> None:
        err.print(f"[yellow]{name}: stopping after the current exchange (again to exit at once)…[/]")

    code = runtime.run(_train_child, cfg, configs, verbose, poisons, resume, done, failures, on_signal=on_signal)
    metrics_file = Path(cfg.run_dir) / "metrics.json"
    if code != 0:
        err.print(f"[red]error:[/] the simulation runtime ended with exit code {code}"
                  + (f"; continue the run with: medfed-server simulate --resume {cfg.run_dir}"
                     if metrics_file.is_file() else "; rerun with --verbose"))
        raise typer.Exit(1)
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def _train_child(cfg: RunConfig, configs: list[SiteConfig], verbose: bool, poisons: tuple, resume: bool, done: int,
                 failures: tuple, *, stop: Any) -> None:
    """The simulation itself (child process): one line per round under a progress bar."""
    from server.simulate import run_simulation_runtime

    progress = Progress(TextColumn("[bold]training"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, transient=True)
    with progress:
        task = progress.add_task("rounds", total=cfg.num_server_rounds, completed=done)

        def on_round(row: dict[str, Any]) -> None:
            progress.update(task, completed=row["round"])
            eps = max(row.get("epsilon", {}).values(), default=None)
            progress.console.print(
                f"round {row['round']}: sites {len(row['sites'])}/{len(configs)}  "
                f"refused {len(row.get('refused', []))}  train loss {fmt(row.get('train_loss'))}  "
                f"val AUROC {fmt(row.get('val_auroc'))}  max ε {fmt(eps, 3)}  {fmt(row['seconds'], 1)}s")

        run_simulation_runtime(cfg, configs, on_round=on_round, verbose=verbose, poisons=poisons, stop=stop,
                               resume=resume, failures=failures)


def _finish(out: Path, configs: list[SiteConfig], fingerprint: str, *, sites_dir: Path | None, keys_dir: Path | None,
            as_json: bool) -> None:
    """Verify the run with the roster made before it, write the report, print the summary."""
    from privacy.audit.trust import from_roster
    from server.rundir import private_keys_dir
    from server.simulate import KEYS_DIR, ROSTER_FILE

    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        err.print(f"[red]error:[/] the run ended without writing {metrics_file}; rerun with --verbose")
        raise typer.Exit(1)
    metrics = json.loads(metrics_file.read_text())
    # verifies the server's and every site's audit log with the roster made before the run
    report, built = write_report(out, from_roster(out / KEYS_DIR / ROSTER_FILE, fingerprint),
                                 site_sources=[c.workspace for c in configs] if sites_dir else [])
    if as_json:
        print(json.dumps(metrics))
        return
    err.print(round_table(metrics["rounds"], len(configs)))
    verdict = "verified" if built.verdict.ok else f"[red]FAILED verification: {built.verdict.problems[0]}[/]"
    err.print(f"audit logs: {verdict}; report: {report}")
    err.print(f"verify it yourself: medfed-audit verify {out}{' ' + str(sites_dir) + '/*' if sites_dir else ''} "
              f"--roster-fingerprint {fingerprint}")
    err.print(f"run directory: {out}  (metrics.json, audit.jsonl, report.html, checkpoints/, model-final.npz); "
              f"private keys: {keys_dir or private_keys_dir(out)}")


register_deployment(cli)


def main() -> None:
    """Console-script entry point: files it creates are the service account's only."""
    from privacy.errors import run_cli
    from privacy.files import private_files

    private_files()
    run_cli(cli, "medfed-server")


if __name__ == "__main__":
    main()
