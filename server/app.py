"""The central Flower ServerApp (Message API)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import RunConfig, pop_resume
from server.initial_model import initial_model
from server.resume import resume_point, run_lock
from server.rounds import RoundCallback, run_federation
from server.stop import StopRequest


def build_server_app(config: RunConfig | None = None, on_round: RoundCallback | None = None, *,
                     stop: StopRequest | None = None, resume: bool = False) -> ServerApp:
    """The ServerApp; ``config`` given by a driver wins over ``context.run_config``. ``resume`` (or
    the run-config key ``resume = true``: ``medfed-server run --resume``): continue the run in
    ``run_dir`` (``server.resume``) under its own run id and config; ``stop``: the driver's stop
    request (signals). One server process runs a run directory at a time (``RUN_DIR/run.lock``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        resuming = pop_resume(run_config) or resume
        cfg = config or RunConfig.from_run_config(run_config)
        if not cfg.run_dir:
            cfg = replace(cfg, run_dir=f"runs/{context.run_id}")
        with run_lock(Path(cfg.run_dir)):
            if resuming:
                point = resume_point(Path(cfg.run_dir))
                run_federation(grid, point.config, point.arrays, run_id=point.run_id, on_round=on_round, stop=stop,
                               resume=point)
                return
            initial, weights_sha256 = initial_model(cfg)
            run_federation(grid, cfg, initial, run_id=str(context.run_id), on_round=on_round,
                           init_weights_sha256=weights_sha256, stop=stop)

    return server_app


app = build_server_app()
