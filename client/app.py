"""The site's Flower ClientApp (Message API): train and evaluate on local DICOM data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import SiteConfig, load_site_config
from client.models import build_model, get_arrays, pick_device, set_arrays
from client.site import load_site_data
from client.train import LocalPlan, evaluate, train_plain
from privacy import egress as K
from privacy.wire import arrays_to_record, record_to_arrays

NODE_SITE_KEY = "site-workspace"


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


def _train(msg: Message, site: SiteConfig) -> Message:
    cfg = msg.content[K.CONFIG]
    data = load_site_data(site, image_size=int(cfg[K.IMAGE_SIZE]))
    device = pick_device(site.device)
    model = build_model()
    global_arrays = record_to_arrays(msg.content[K.ARRAYS])
    set_arrays(model, global_arrays)
    plan = LocalPlan(
        steps=int(cfg[K.LOCAL_STEPS]), batch_size=int(cfg[K.BATCH_SIZE]),
        learning_rate=float(cfg[K.LEARNING_RATE]),
        seed=int(cfg[K.SEED]) * 1000 + int(cfg[K.SERVER_ROUND]),
    )
    result = train_plain(model, data.train, plan, device)
    new = get_arrays(model)
    update = {k: new[k] - global_arrays[k] for k in new}
    metrics = {K.NUM_EXAMPLES: data.train.n_patients, K.TRAIN_LOSS: result.train_loss}
    return Message(
        RecordDict({
            K.ARRAYS: arrays_to_record(update),
            K.METRICS: MetricRecord(metrics),
            K.SITE: ConfigRecord({K.SITE_NAME: site.name}),
        }),
        reply_to=msg,
    )


def _evaluate(msg: Message, site: SiteConfig) -> Message:
    cfg = msg.content[K.CONFIG]
    data = load_site_data(site, image_size=int(cfg[K.IMAGE_SIZE]))
    model = build_model()
    set_arrays(model, record_to_arrays(msg.content[K.ARRAYS]))
    res = evaluate(model, data.val, pick_device(site.device))
    metrics: dict[str, float | int] = {K.NUM_EXAMPLES: res.num_examples, K.VAL_LOSS: res.loss}
    if res.auroc is not None:
        metrics[K.VAL_AUROC] = res.auroc
    return Message(
        RecordDict({K.METRICS: MetricRecord(metrics), K.SITE: ConfigRecord({K.SITE_NAME: site.name})}),
        reply_to=msg,
    )


def build_client_app(sim_sites: Sequence[str] = ()) -> ClientApp:
    """The ClientApp; ``sim_sites`` lists virtual sites' workspaces in a simulation."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(msg, resolve_site(context, sim_sites))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return _evaluate(msg, resolve_site(context, sim_sites))

    return client_app


app = build_client_app()
