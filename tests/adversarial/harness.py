"""A malicious central server that speaks to a site's real ClientApp (all its mods) with real
Flower messages: it chooses every field of every request and reads every reply."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.app import NODE_SITE_KEY, build_client_app
from client.models import build_model, get_arrays
from privacy import egress as K
from privacy.model_arrays import arrays_to_record, record_to_arrays
from privacy.protocol import RoundRequest


def request(**changes: object) -> RoundRequest:
    """A round request; the attacker sets any field."""
    base = RoundRequest(server_round=1, run_id="run-evil", num_rounds=3, local_steps=5, batch_size=8,
                        learning_rate=2e-3, image_size=16, dp=True, noise_multiplier=0.0)
    return replace(base, **changes)  # type: ignore[arg-type]


def message(kind: str, content: RecordDict, node: int = 7) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content, metadata=md)


@dataclass
class MaliciousServer:
    """Sends crafted ``train``/``evaluate`` messages to one site's real ClientApp."""

    workspace: Path
    node: int = 7

    def __post_init__(self) -> None:
        self.app = build_client_app()
        self.context = Context(run_id=1, node_id=self.node, node_config={NODE_SITE_KEY: str(self.workspace)},
                               state=RecordDict(), run_config={})

    def send(self, kind: str, req: RoundRequest, arrays: OrderedDict[str, np.ndarray] | None = None,
             extra: dict[str, object] | None = None) -> Message:
        conf = req.to_record()
        for k, v in (extra or {}).items():
            conf[k] = v  # type: ignore[assignment]
        model = arrays if arrays is not None else get_arrays(build_model(seed=0))
        content = RecordDict({K.ARRAYS: arrays_to_record(model), K.CONFIG: ConfigRecord(dict(conf))})
        return self.app(message(kind, content, self.node), self.context)

    def train(self, req: RoundRequest, arrays: OrderedDict[str, np.ndarray] | None = None) -> Message:
        return self.send(MessageType.TRAIN, req, arrays)

    def evaluate(self, req: RoundRequest, arrays: OrderedDict[str, np.ndarray] | None = None) -> Message:
        return self.send(MessageType.EVALUATE, req, arrays)


def update(reply: Message) -> OrderedDict[str, np.ndarray]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return record_to_arrays(reply.content.array_records[K.ARRAYS])


def metrics(reply: Message) -> dict[str, float]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {k: float(v) for k, v in reply.content.metric_records[K.METRICS].items()}  # type: ignore[arg-type]
