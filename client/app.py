"""The site's Flower ClientApp (Message API): train and evaluate on local DICOM data."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from client.audit_trail import RoundIds, SiteAudit
from client.budget import RepeatedRelease, RoundCapReached, RoundPrivacy, plan_evaluation, plan_round
from client.config import SiteConfig, load_site_config
from client.guard import egress_guard
from client.model_names import ModelNameError, ModelRefused
from client.models import build_model, get_arrays, pick_device, set_arrays
from client.networks import grad_sample_mode
from client.randomness import round_seeds
from client.secagg_mod import masking, secagg_mod
from client.site import SiteData, load_site_data
from client.site_ledger import commit, open_ledger
from client.train import LocalPlan, evaluate, logits, macro, train_plain, train_private
from privacy import egress as K
from privacy.bundle import installed_digest
from privacy.dp import BudgetExhausted
from privacy.dp_metrics import patient_sums, release
from privacy.ledger import LedgerEvent, PrivacyLedger, now_utc
from privacy.model_arrays import arrays_sha256, arrays_to_record, record_to_arrays
from privacy.protocol import RoundRequest, checked_model, server_head
from privacy.update_norm import clip_to_norm

NODE_SITE_KEY = "site-workspace"
log = logging.getLogger("medfed.site")


def resolve_site(context: Context, sim_sites: Sequence[str]) -> SiteConfig:
    """Find this node's site workspace.

    Deployed SuperNodes name it in their node config (``site-workspace``); in a
    simulation the driver passes one workspace per virtual node (by ``partition-id``).
    """
    if NODE_SITE_KEY in context.node_config:
        return load_site_config(Path(str(context.node_config[NODE_SITE_KEY])))
    if sim_sites:
        return load_site_config(Path(sim_sites[int(context.node_config["partition-id"])]))
    raise RuntimeError(
        f"node config has no '{NODE_SITE_KEY}': start the SuperNode with `medfed-site start`"
    )


def _reply(msg: Message, site: SiteConfig, metrics: Mapping[str, float | int],
           update: Mapping[str, np.ndarray] | None = None, audit_head: str | None = None) -> Message:
    identity = ConfigRecord({K.SITE_NAME: site.name})
    if audit_head is not None:
        identity[K.AUDIT_HEAD] = audit_head
    content = RecordDict({K.METRICS: MetricRecord(dict(metrics)), K.SITE: identity})
    if update is not None:
        content[K.ARRAYS] = arrays_to_record(update)
    return Message(content, reply_to=msg)


def _refuse(msg: Message, site: SiteConfig, audit: SiteAudit, ids: RoundIds, *, code: int, reason: str,
            metrics: Mapping[str, float | int]) -> Message:
    log.warning("site %s refuses round %s: %s", site.name, ids.round, reason)
    audit.refused(ids, reason=reason, epsilon=float(metrics.get(K.EPSILON, 0.0)))
    return _reply(msg, site, {K.REFUSED: 1, K.REFUSAL_CODE: code, **metrics}, audit_head=audit.head())


def _refuse_evaluation(msg: Message, site: SiteConfig, audit: SiteAudit, ids: RoundIds, *, code: int,
                       reason: str) -> Message:
    log.warning("site %s withholds validation metrics of round %s: %s", site.name, ids.round, reason)
    audit.evaluation_refused(ids, reason=reason)
    return _reply(msg, site, {K.REFUSED: 1, K.REFUSAL_CODE: code}, audit_head=audit.head())


def _train(msg: Message, site: SiteConfig, *, masked: bool = False) -> Message:
    """``masked``: the site's SecAgg+ mod runs this round and masks the update (its own state
    says so, not the request)."""
    conf = msg.content.config_records[K.CONFIG]
    req = RoundRequest.from_record(conf)
    global_arrays = checked_model(record_to_arrays(msg.content.array_records[K.ARRAYS]))
    audit = SiteAudit(site)
    ids = RoundIds(req.run_id, req.server_round, arrays_sha256(global_arrays), server_head(conf))
    model = _site_model(site, req)
    if isinstance(model, str):
        return _refuse(msg, site, audit, ids, code=K.REFUSED_MODEL, reason="model-not-approved", metrics={})
    data = load_site_data(site, image_size=req.image_size, findings=req.finding_names, windows=req.voi_windows)
    policy = site.privacy
    patients = data.train.n_patients
    set_arrays(model, global_arrays)
    _join(audit, site, req.run_id, data)
    device = pick_device(site.device)
    metrics: dict[str, float | int] = {K.PATIENTS: patients}
    if policy.require_secure_aggregation and not masked:
        return _refuse(msg, site, audit, ids, code=K.REFUSED_POLICY, reason="secure-aggregation-required",
                       metrics={K.PATIENTS: patients})
    if policy.dp or req.dp:  # the site's policy wins; DP if either asks for it
        delta = policy.delta_for(patients)
        rp: list[RoundPrivacy] = []

        def planned(ledger: PrivacyLedger) -> LedgerEvent:
            rp[:] = [plan_round(policy, ledger, patients=patients, batch_size=req.batch_size, steps=req.local_steps,
                                run_id=req.run_id, server_round=req.server_round, rounds_left=req.rounds_left,
                                requested_noise=req.noise_multiplier)]
            return LedgerEvent(round=req.server_round, run_id=req.run_id, noise_multiplier=rp[0].noise_multiplier,
                               sample_rate=rp[0].sample_rate, steps=rp[0].steps, accountant=policy.accountant,
                               epsilon_after=rp[0].epsilon_after, delta=rp[0].delta, timestamp=now_utc(),
                               grad_sample_mode=grad_sample_mode(req.model))

        try:  # counted before training, so an update that leaves has always been counted
            ledger, event = commit(site, planned)
        except (BudgetExhausted, RoundCapReached, RepeatedRelease) as exc:
            code, reason = {RoundCapReached: (K.REFUSED_ROUND_CAP, "round-cap"),
                            RepeatedRelease: (K.REFUSED_REPEAT, "round-repeated")}.get(type(exc), (K.REFUSED_BUDGET, "budget"))
            eps = open_ledger(site).epsilon(delta=delta, accountant=policy.accountant)
            return _refuse(msg, site, audit, ids, code=code, reason=reason,
                           metrics={K.EPSILON: eps, K.DELTA: delta, K.PATIENTS: patients})
        seeds = round_seeds(policy, site=site.name, release=f"train:{len(ledger.events) - 1}")  # never the request's
        audit.trained(ids, event, patients=patients, deterministic=seeds.deterministic, model=req.model,
                      findings=req.finding_names)
        plan = LocalPlan(steps=req.local_steps, batch_size=req.batch_size, learning_rate=req.learning_rate,
                         seed=seeds.sampling, optimizer=req.optimizer)
        result = train_private(model, data.train, plan, device, noise_multiplier=event.noise_multiplier,
                               max_grad_norm=policy.max_grad_norm, noise_seed=seeds.noise,
                               secure_mode=policy.secure_noise, grad_sample_mode=event.grad_sample_mode)
        # the site's own σ, never an echo of the server's number (an echo could be matched against identifiers)
        metrics |= {K.EPSILON: event.epsilon_after, K.DELTA: event.delta,
                    K.NOISE_MULTIPLIER: rp[0].site_noise_multiplier, K.NOISE_OVERRIDDEN: int(rp[0].overridden)}
    else:
        log.warning("site %s trains WITHOUT differential privacy (policy dp = false)", site.name)
        seeds = round_seeds(policy, site=site.name, release=f"plain:{req.run_id}:{req.server_round}")
        audit.trained(ids, None, patients=patients, deterministic=seeds.deterministic, model=req.model,
                      findings=req.finding_names)
        plan = LocalPlan(steps=req.local_steps, batch_size=req.batch_size, learning_rate=req.learning_rate,
                         seed=seeds.sampling, optimizer=req.optimizer)
        result = train_plain(model, data.train, plan, device)
    log.info("site %s trained round %d (%s on %s): %.1f images/s, training memory %.0f MiB", site.name,
             req.server_round, req.model, device.type, result.images_per_s, result.peak_mib)
    new = get_arrays(model)
    metrics[K.NUM_EXAMPLES] = patients
    if not (policy.dp or req.dp) or policy.metrics == "exact":
        metrics[K.TRAIN_LOSS] = result.train_loss  # not DP-protected: released only without a guarantee to keep
    update, norm = clip_to_norm({k: new[k] - global_arrays[k] for k in new}, site.robustness.max_update_norm)
    if site.robustness.max_update_norm > 0:  # the site's own bound, before the update is masked
        audit.update_bounded(ids, bound=site.robustness.max_update_norm,
                             scaled=norm > site.robustness.max_update_norm)
    return _reply(msg, site, metrics, update, audit_head=audit.head())


def _site_model(site: SiteConfig, req: RoundRequest) -> nn.Module | str:
    """The requested network built from this site's own code, or why this site refuses it (logged)."""
    why = site.task_refusal(req.model, req.image_size, req.finding_names, req.batch_size)
    if why is None:
        try:
            return build_model(req.model, outputs=req.outputs, in_channels=req.channels, factories=site.models.factories)
        except (ModelRefused, ModelNameError) as exc:
            why = str(exc)
    log.warning("site %s does not train the requested network or task: %s", site.name, why)
    return why


def _join(audit: SiteAudit, site: SiteConfig, run_id: str, data: SiteData) -> None:
    policy = site.privacy
    audit.join(run_id, {
        "dp": policy.dp, "max_epsilon": policy.max_epsilon, "accountant": policy.accountant,
        "max_epsilon_per_round": policy.max_epsilon_per_round, "max_rounds_per_run": policy.max_rounds_per_run,
        "metrics": policy.metrics, "secure_noise": policy.secure_noise, "deterministic_noise": policy.seed is not None,
        "code_sha256": _code_digest(),
        "data_sha256": data.train.fingerprint, "images": len(data.train.labels) + len(data.val.labels),
        "patients": data.train.n_patients + data.val.n_patients,
        "canaries": data.canaries,  # a DP audit's planted canary patients among the training patients
    })


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The digest of the medfed code running this ClientApp (``privacy.bundle``)."""
    return installed_digest()


def _evaluate(msg: Message, site: SiteConfig) -> Message:
    """Validation metrics of the model the server sent, released as the site's policy says:
    ``dp`` noisy and charged to the ledger (once per round the site trained), ``exact``
    unmetered (warned: no guarantee), ``none`` refused."""
    conf = msg.content.config_records[K.CONFIG]
    req = RoundRequest.from_record(conf)
    arrays = checked_model(record_to_arrays(msg.content.array_records[K.ARRAYS]))
    policy = site.privacy
    audit = SiteAudit(site)
    ids = RoundIds(req.run_id, req.server_round, arrays_sha256(arrays), server_head(conf))
    if policy.metrics == "none":
        return _refuse_evaluation(msg, site, audit, ids, code=K.REFUSED_METRICS, reason="metrics-withheld")
    model = _site_model(site, req)
    if isinstance(model, str):
        return _refuse_evaluation(msg, site, audit, ids, code=K.REFUSED_MODEL, reason="model-not-approved")
    data = load_site_data(site, image_size=req.image_size, findings=req.finding_names, windows=req.voi_windows)
    set_arrays(model, arrays)
    device = pick_device(site.device)
    metered = policy.dp or req.dp
    if policy.metrics == "exact" or not metered:
        if metered:
            log.warning("site %s releases EXACT validation metrics (privacy.metrics = 'exact'): a crafted model can "
                        "read its validation labels through them; use only with synthetic data", site.name)
        audit.evaluated(ids, None, metrics="exact", deterministic=policy.seed is not None)
        res = evaluate(model, data.val, device)
        metrics: dict[str, float | int] = {K.NUM_EXAMPLES: res.num_examples, K.VAL_LOSS: res.loss}
        if res.auroc is not None:
            metrics[K.VAL_AUROC] = res.auroc
        metrics |= {K.FINDING_AUROC[j]: v for j, v in enumerate(res.findings_auroc) if v is not None}
        return _reply(msg, site, metrics, audit_head=audit.head())
    patients = data.train.n_patients

    def planned(ledger: PrivacyLedger) -> LedgerEvent:
        mech, after = plan_evaluation(policy, ledger, patients=patients, run_id=req.run_id,
                                      server_round=req.server_round)
        return LedgerEvent(round=req.server_round, run_id=req.run_id, noise_multiplier=mech.noise_multiplier,
                           sample_rate=mech.sample_rate, steps=mech.steps, accountant=policy.accountant,
                           epsilon_after=after, delta=policy.delta_for(patients), timestamp=now_utc(), kind="evaluate")

    try:
        ledger, event = commit(site, planned)
    except RepeatedRelease:
        return _refuse_evaluation(msg, site, audit, ids, code=K.REFUSED_METRICS, reason="not-trained-or-evaluated")
    except BudgetExhausted:
        return _refuse_evaluation(msg, site, audit, ids, code=K.REFUSED_BUDGET, reason="budget")
    seeds = round_seeds(policy, site=site.name, release=f"evaluate:{len(ledger.events) - 1}")
    audit.evaluated(ids, event, metrics="dp", deterministic=seeds.deterministic)
    return _reply(msg, site, _metered_metrics(model, data, device, event, seeds.evaluation), audit_head=audit.head())


def _metered_metrics(model: nn.Module, data: SiteData, device: torch.device, event: LedgerEvent,
                     seed: int) -> dict[str, float | int]:
    """The validation metrics of one metered release (a multi-label task: one noisy vector per
    finding, together one Gaussian mechanism of the event's σ; ``privacy.dp_metrics``)."""
    scores, labels, groups = logits(model, data.val, device), data.val.labels, data.val.patient_images()
    rng = np.random.default_rng(seed)
    if labels.ndim == 1:
        noisy = [release(patient_sums(scores, labels, groups), noise_multiplier=event.noise_multiplier, rng=rng)]
    else:
        f = labels.shape[1]
        noisy = [release(patient_sums(scores[:, j], labels[:, j], groups), noise_multiplier=event.noise_multiplier,
                         rng=rng, parts=f) for j in range(f)]
    metrics: dict[str, float | int] = {
        K.NUM_EXAMPLES: max(0, round(float(np.mean([m.patients for m in noisy])))),
        K.VAL_LOSS: float(np.mean([m.loss for m in noisy])), K.EPSILON: event.epsilon_after}
    per = tuple(m.auroc for m in noisy)
    overall = macro(per)
    if overall is not None:
        metrics[K.VAL_AUROC] = overall
    if labels.ndim == 2:
        metrics |= {K.FINDING_AUROC[j]: v for j, v in enumerate(per) if v is not None}
    return metrics


def build_client_app(sim_sites: Sequence[str] = (), inner_mods: Sequence[Mod] = (),
                     outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; ``sim_sites`` lists virtual sites' workspaces in a simulation.

    Every reply passes the egress guard (outermost mod); ``train`` messages of a secure
    aggregation round pass the SecAgg+ client, which masks the update before it leaves.
    ``inner_mods`` (innermost) and ``outer_mods`` (outside the guard): a simulation's fault
    injection (``server.chaos``), never deployed."""

    def resolve(context: Context) -> SiteConfig:
        return resolve_site(context, sim_sites)

    client_app = ClientApp(mods=[*outer_mods, egress_guard(resolve), secagg_mod(resolve), *inner_mods])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(msg, resolve_site(context, sim_sites), masked=masking(context))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return _evaluate(msg, resolve_site(context, sim_sites))

    return client_app


app = build_client_app()
