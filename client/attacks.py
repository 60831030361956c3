"""The privacy attacks a site runs at home against a finished run (``medfed-audit attack``):
membership inference on its own patients, gradient inversion of the update it would send, and
the canary audit of its DP guarantee. Only the numbers of ``privacy.attacks.result`` leave;
an inversion's image grid stays in the workspace."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.canaries import all_canaries, planted
from client.config import SiteConfig
from client.dicom import Cohort
from client.run_task import RunTask
from client.site import SiteData, load_site_data
from client.site_ledger import open_ledger
from client.train import LocalPlan, evaluate, image_losses, logits, train_plain
from privacy.attacks import canary as canary_audit
from privacy.attacks.membership import calibrated_scores, confidence, loss_scores, per_patient, reference_halves
from privacy.attacks.result import KINDS, attack_result
from privacy.attacks.roc import separation
from privacy.files import atomic_write_json, private_dir
from privacy.model_arrays import arrays_sha256

ATTACKS_DIR = "audit/attacks"  # in the site workspace: results and image grids, never sent


def _pooled_confidence(scores: np.ndarray, cohort: Cohort) -> np.ndarray:
    return per_patient(confidence(scores, cohort.labels), cohort.patient, cohort.n_patients)


def _patient_confidence(model: nn.Module, cohort: Cohort, device: torch.device) -> np.ndarray:
    return _pooled_confidence(logits(model, cohort, device), cohort)


def membership(config: SiteConfig, task: RunTask, final: dict[str, np.ndarray], data: SiteData, *,
               references: int = 4, reference_steps: int = 0, rng: np.random.Generator) -> dict[str, Any]:
    """Loss and calibrated (LiRA offline) attacks on the site's training patients (members) and
    validation patients (non-members) of ``data``, with the final global model. Reference models
    start from the run's initial model and train, without DP, on random halves of the validation
    patients for ``reference_steps`` steps (default: as many as the run's local training took)."""
    device = torch.device("cpu")
    model = task.network(final, factories=config.models.factories)
    members, non = data.train, data.val
    sm, sn = logits(model, members, device), logits(model, non, device)
    lm = loss_scores(image_losses(sm, members.labels), members.patient, members.n_patients)
    ln = loss_scores(image_losses(sn, non.labels), non.patient, non.n_patients)
    out: dict[str, Any] = {"loss": separation(lm, ln).as_dict()}
    if references >= 2 and non.n_patients >= 4:
        halves = reference_halves(non.n_patients, references, rng)
        ref_m, ref_n = [], []
        steps = reference_steps or task.rounds * task.local_steps
        for k in range(references):
            ref = task.network(factories=config.models.factories)
            plan = LocalPlan(steps=steps, batch_size=task.batch_size, learning_rate=task.learning_rate,
                             seed=int(rng.integers(2**62)), optimizer=task.optimizer)
            train_plain(ref, non.subset(np.flatnonzero(halves[k])), plan, device)
            ref_m.append(_patient_confidence(ref, members, device))
            ref_n.append(_patient_confidence(ref, non, device))
        target = np.r_[_pooled_confidence(sm, members), _pooled_confidence(sn, non)]
        outside = np.c_[np.ones((references, members.n_patients), bool), ~halves]
        cal = calibrated_scores(target, [np.r_[a, b] for a, b in zip(ref_m, ref_n, strict=True)], outside)
        out["calibrated"] = separation(cal[: members.n_patients], cal[members.n_patients :]).as_dict()
        out["reference_models"] = references
    return out


def utility(config: SiteConfig, task: RunTask, final: dict[str, np.ndarray], data: SiteData) -> dict[str, float]:
    """The final model's exact validation AUROC and loss at the site (beside every attack figure)."""
    res = evaluate(task.network(final, factories=config.models.factories), data.val, torch.device("cpu"))
    return {"val_loss": res.loss, **({"val_auroc": res.auroc} if res.auroc is not None else {})}


def canary(config: SiteConfig, task: RunTask, final: dict[str, np.ndarray], data: SiteData, *,
           guesses: float = 0.5) -> dict[str, Any]:
    """Score the planted canaries with the final model (minus their loss) and bound ε from the
    guesses: the ``guesses`` share of canaries is guessed, half "in" (highest scores), half "out"."""
    found = planted(config)
    if found is None:
        raise FileNotFoundError(f"{config.workspace} has no planted canaries: the canary audit needs them in the "
                                "training set from the first round (simulate --privacy-audit plants them)")
    model = task.network(final, factories=config.models.factories)
    device = torch.device("cpu")
    cin, cout = all_canaries(config, found, task.image_size, task.windows[0] if task.windows else None)
    scores = np.empty(found.m)
    for cohort, side in ((cin, found.included), (cout, ~found.included)):
        if cohort is not None:
            scores[np.flatnonzero(side)] = -per_patient(image_losses(logits(model, cohort, device), cohort.labels),
                                                        cohort.patient, cohort.n_patients)
    ledger = open_ledger(config)
    patients = data.train.n_patients + int(found.included.sum())  # as training counted them: canaries included
    delta = config.privacy.delta_for(patients)
    trained_dp = any(e.kind == "train" for e in ledger.events)
    accountant = ledger.epsilon(delta=delta, accountant=config.privacy.accountant) if trained_dp else None
    order = np.random.default_rng(secrets.randbits(128)).permutation(found.m)  # ties: broken at random
    k = max(1, int(round(guesses * found.m / 2)))
    result = canary_audit.audit(scores[order], found.included[order], delta=delta, guesses_in=k, guesses_out=k)
    doc: dict[str, Any] = {**result.as_dict(), "accountant_epsilon": accountant}
    doc["within_accountant"] = accountant is None or result.epsilon_lower_bound <= accountant
    return doc


def run_attacks(config: SiteConfig, run_dir: Path, *, kinds: tuple[str, ...] = KINDS, references: int = 4,
                reference_steps: int = 0, inversion_iterations: int = 0, seed: int | None = None,
                simulated: bool = False) -> dict[str, Any]:
    """Run the chosen attacks at the site; write the result (and any image grid) under
    ``WORKSPACE/audit/attacks/`` and return the result (its closed schema: ``privacy.attacks.result``).

    The run directory is the server's: a workspace inside it (its site.toml, its data paths, its
    cache) is refused, except for a simulation's virtual sites (``simulated``)."""
    run_dir = Path(run_dir).resolve()
    if not simulated and config.workspace.resolve().is_relative_to(run_dir):
        raise ValueError(f"the workspace {config.workspace} lies inside the run directory, which the server wrote: "
                         "attack with your site's own workspace (--workspace)")
    task, final = RunTask.from_run_dir(run_dir)
    why = config.task_refusal(task.model, task.image_size, task.finding_names, task.batch_size)
    if why is not None:
        raise ValueError(f"{config.name} does not run this run's task: {why}")
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
    data = load_site_data(config, image_size=task.image_size, findings=task.finding_names, windows=task.windows,
                          canaries=False)  # the real patients, loaded once for every attack
    doc: dict[str, Any] = {"site": config.name, "run_id": task.run_id, "model_sha256": arrays_sha256(final),
                           "utility": utility(config, task, final, data)}
    if "membership" in kinds:
        doc["membership"] = membership(config, task, final, data, references=references,
                                       reference_steps=reference_steps, rng=rng)
    if "canary" in kinds:
        doc["canary"] = canary(config, task, final, data)
    if "inversion" in kinds:
        from client.inversion_at_site import inversion  # torch double-backward: loaded only when asked for

        doc["inversion"] = inversion(config, task, final, data, iterations=inversion_iterations,
                                     grid=private_dir(config.workspace / ATTACKS_DIR) / f"inversion-{task.run_id}.png",
                                     rng=rng)
    result = attack_result(doc)
    atomic_write_json(private_dir(config.workspace / ATTACKS_DIR) / f"{task.run_id}.json", result)
    return result
