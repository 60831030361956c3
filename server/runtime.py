"""The simulation runtime's process: the environment it and its Ray workers run in, and its warm
start (``server.stop.Supervisor`` runs :func:`warm_runtime` in the child before the run is known).

Only the standard library at import: the parent starts the child before it imports anything heavy."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def runtime_environment(verbose: bool) -> dict[str, str]:
    """What the runtime and its Ray workers need: telemetry off, Ray's log dedup off, no Ray
    override of accelerator variables for 0 GPUs; Python warnings off unless ``verbose``."""
    env = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    if not verbose:
        env["PYTHONWARNINGS"] = "ignore"  # inherited by the Ray workers
    return env


def ray_init_args(verbose: bool) -> dict[str, Any]:
    """``ray.init`` arguments: every core, no dashboard; Ray's and its workers' logs only if ``verbose``."""
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.WARNING}


def warm_runtime(verbose: bool = False) -> None:
    """In the runtime's child while the parent still prepares the sites: import the simulation
    runtime and both apps, and start Ray as Flower's Ray backend would start it (that backend uses a
    Ray already started: ``ray.is_initialized()``), with the driver's ``sys.path`` for the workers.
    Ray's start (~2 s) and the imports (~2.5 s) then overlap the parent's work. The child runs
    nothing else, so the environment is set for the process."""
    for key, value in runtime_environment(verbose).items():
        os.environ.setdefault(key, value)
    import ray
    from flwr.simulation import run_simulation  # noqa: F401  (imported here to be warm, used by the job)

    import client.app  # noqa: F401
    import server.app  # noqa: F401

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **ray_init_args(verbose))
