"""The round request the server sends to every site, typed once for both sides."""

from __future__ import annotations

from dataclasses import dataclass, fields

from flwr.app import ConfigRecord

from privacy import egress as K

_KEYS = {
    "server_round": K.SERVER_ROUND, "run_id": K.RUN_ID, "num_rounds": K.NUM_ROUNDS,
    "local_steps": K.LOCAL_STEPS, "batch_size": K.BATCH_SIZE, "learning_rate": K.LEARNING_RATE,
    "image_size": K.IMAGE_SIZE, "seed": K.SEED, "dp": K.DP_ENABLED,
    "noise_multiplier": K.NOISE_MULTIPLIER_REQUEST,
}


class RoundRequestError(ValueError):
    """The server's round configuration is missing a key or has a wrong type."""


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks every site to do in one round."""

    server_round: int
    run_id: str
    num_rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    image_size: int
    seed: int
    dp: bool
    noise_multiplier: float  # the minimum the server asks for; a site may use more

    @property
    def rounds_left(self) -> int:
        """Rounds still planned, this one included."""
        return max(1, self.num_rounds - self.server_round + 1)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({key: getattr(self, name) for name, key in _KEYS.items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundRequest:
        values = {}
        for f in fields(cls):
            key = _KEYS[f.name]
            if key not in record:
                raise RoundRequestError(f"round config lacks {key!r}: server and site versions differ")
            caster = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            try:
                values[f.name] = caster(record[key])
            except (TypeError, ValueError):
                raise RoundRequestError(f"round config {key!r} is not a valid {f.type}") from None
        return cls(**values)
