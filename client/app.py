"""The site's Flower ClientApp (Message API): train and evaluate on local DICOM data."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit_trail import RoundIds, SiteAudit
from client.budget import REFUSED_BUDGET, REFUSED_POLICY, plan_round
from client.config import SiteConfig, load_site_config
from client.guard import egress_guard
from client.models import build_model, get_arrays, pick_device, set_arrays
from client.secagg_mod import secagg_mod
from client.site import load_site_data
from client.train import LocalPlan, evaluate, train_plain, train_private
from privacy import egress as K
from privacy.dp import BudgetExhausted
from privacy.ledger import LedgerEvent, PrivacyLedger, now_utc
from privacy.protocol import RoundRequest
from privacy.wire import arrays_sha256, arrays_to_record, record_to_arrays

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


def _train(msg: Message, site: SiteConfig) -> Message:
    conf = msg.content.config_records[K.CONFIG]
    req = RoundRequest.from_record(conf)
    data = load_site_data(site, image_size=req.image_size)
    policy = site.privacy
    patients = data.train.n_patients
    plan = LocalPlan(steps=req.local_steps, batch_size=req.batch_size, learning_rate=req.learning_rate,
                     seed=req.seed * 1000 + req.server_round)
    model = build_model()
    global_arrays = record_to_arrays(msg.content.array_records[K.ARRAYS])
    set_arrays(model, global_arrays)
    audit = SiteAudit(site)
    audit.join(req.run_id, {
        "dp": policy.dp, "max_epsilon": policy.max_epsilon, "accountant": policy.accountant,
        "data_sha256": data.train.fingerprint, "images": len(data.train.labels) + len(data.val.labels),
        "patients": data.train.n_patients + data.val.n_patients,
    })
    ids = RoundIds(req.run_id, req.server_round, arrays_sha256(global_arrays))
    device = pick_device(site.device)
    metrics: dict[str, float | int] = {K.PATIENTS: patients}
    if policy.require_secure_aggregation and conf.get(K.SECAGG_STAGE) != "input":
        log.warning("site %s refuses round %s: the update would leave unmasked and the site policy requires "
                    "secure aggregation", site.name, req.server_round)
        audit.refused(ids, reason="secure-aggregation-required", epsilon=0.0)
        return _reply(msg, site, {K.REFUSED: 1, K.REFUSAL_CODE: REFUSED_POLICY, K.PATIENTS: patients},
                      audit_head=audit.head())
    if policy.dp or req.dp:  # the site's policy wins; DP if either asks for it
        ledger = PrivacyLedger.load(site.ledger_file)
        delta = policy.delta_for(patients)
        try:
            rp = plan_round(policy, ledger, patients=patients, batch_size=plan.batch_size, steps=plan.steps,
                            rounds_left=req.rounds_left, requested_noise=req.noise_multiplier)
        except BudgetExhausted:
            log.warning("site %s refuses round %s: privacy budget exhausted", site.name, req.server_round)
            eps = ledger.epsilon(delta=delta, accountant=policy.accountant)
            audit.refused(ids, reason="budget", epsilon=eps)
            return _reply(msg, site, {K.REFUSED: 1, K.REFUSAL_CODE: REFUSED_BUDGET, K.EPSILON: eps,
                                      K.DELTA: delta, K.PATIENTS: patients}, audit_head=audit.head())
        # counted before training, so an update that leaves has always been counted
        event = LedgerEvent(
            round=req.server_round, run_id=req.run_id, noise_multiplier=rp.noise_multiplier,
            sample_rate=rp.sample_rate, steps=rp.steps, accountant=policy.accountant,
            epsilon_after=rp.epsilon_after, delta=rp.delta, timestamp=now_utc(),
        )
        ledger.append(event)
        audit.trained(ids, event, patients=patients)
        result = train_private(model, data.train, plan, device, noise_multiplier=rp.noise_multiplier,
                               max_grad_norm=policy.max_grad_norm)
        metrics |= {K.EPSILON: rp.epsilon_after, K.DELTA: rp.delta,
                    K.NOISE_MULTIPLIER: rp.noise_multiplier, K.NOISE_OVERRIDDEN: int(rp.overridden)}
    else:
        log.warning("site %s trains WITHOUT differential privacy (policy dp = false)", site.name)
        audit.trained(ids, None, patients=patients)
        result = train_plain(model, data.train, plan, device)
    new = get_arrays(model)
    metrics |= {K.NUM_EXAMPLES: patients, K.TRAIN_LOSS: result.train_loss}
    return _reply(msg, site, metrics, {k: new[k] - global_arrays[k] for k in new}, audit_head=audit.head())


def _evaluate(msg: Message, site: SiteConfig) -> Message:
    req = RoundRequest.from_record(msg.content.config_records[K.CONFIG])
    data = load_site_data(site, image_size=req.image_size)
    model = build_model()
    set_arrays(model, record_to_arrays(msg.content.array_records[K.ARRAYS]))
    res = evaluate(model, data.val, pick_device(site.device))
    metrics: dict[str, float | int] = {K.NUM_EXAMPLES: res.num_examples, K.VAL_LOSS: res.loss}
    if res.auroc is not None:
        metrics[K.VAL_AUROC] = res.auroc
    return _reply(msg, site, metrics)


def build_client_app(sim_sites: Sequence[str] = ()) -> ClientApp:
    """The ClientApp; ``sim_sites`` lists virtual sites' workspaces in a simulation.

    Every reply passes the egress guard (outermost mod); ``train`` messages of a secure
    aggregation round pass the SecAgg+ client, which masks the update before it leaves."""

    def resolve(context: Context) -> SiteConfig:
        return resolve_site(context, sim_sites)

    client_app = ClientApp(mods=[egress_guard(resolve), secagg_mod(resolve)])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(msg, resolve_site(context, sim_sites))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return _evaluate(msg, resolve_site(context, sim_sites))

    return client_app


app = build_client_app()
