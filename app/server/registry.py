"""The models this server scores with, by name: each a checkpoint on its own model thread (`Served`), or an ensemble
of them (`Ensemble`); aliases point at either. A request's `model` is resolved here once, when it arrives, so the
model that admitted it is the one that answers it."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.engine.results import Scored, Timing
from app.engine.worker import Worker
from app.model.checkpoint import Normalization
from app.model.ensemble import Aggregate, std
from app.model.info import ModelInfo
from app.model.readout import Readout
from app.model.recipe import Item
from app.server.errors import ErrorType, ServiceError
from app.server.openrlhf import QueryReader
from app.server.scores import EnsembleItemScore, Scores
from app.server.vllm import ModelCard


@dataclass(frozen=True)
class Served:
    """One checkpoint as start-up decided it: its worker, how its outputs are read (`readout`: the checkpoint's, or
    its column of a shared-base worker), the normalization in force, its scoring fingerprint and how OpenRLHF
    queries are read for it."""

    name: str
    path: Path
    worker: Worker
    readout: Readout
    info: ModelInfo
    normalization: Normalization | None
    fingerprint: str
    reader: QueryReader
    created: int  # when it started serving, as /v1/models reports it

    @property
    def members(self) -> tuple[Served, ...]:
        return (self,)

    def read(self, scored: Scored) -> Scores:
        return Scores.of(scored.results, self.readout, self.normalization, self.name, self.fingerprint)

    async def score(self, inputs: list[Item], remaining: float, stated: float) -> tuple[Scores, Timing]:
        scored = await self.worker.score(inputs, remaining, stated)
        return self.read(scored), scored.timing


@dataclass(frozen=True)
class Ensemble:
    """Registered members scored side by side: each member's reward is the one it gives served alone (its own
    normalization applied), and `aggregate` makes them one."""

    name: str
    members: tuple[Served, ...]
    aggregate: Aggregate
    created: int
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        parts = [f"{m.name}={m.fingerprint}" for m in self.members] + [self.aggregate.describe()]
        object.__setattr__(self, "fingerprint", hashlib.sha256("|".join(parts).encode()).hexdigest()[:16])

    @property
    def reader(self) -> QueryReader:
        return self.members[0].reader

    async def score(self, inputs: list[Item], remaining: float, stated: float) -> tuple[Scores, Timing]:
        """Each worker its members run on, at once (members sharing a base share one: one pass gives all their
        rewards); each member's reward is the one it gives alone. One failing cancels the others (their queued items
        are then skipped)."""
        workers = {id(m.worker): m.worker for m in self.members}
        async with asyncio.TaskGroup() as group:
            tasks = {key: group.create_task(w.score(inputs, remaining, stated)) for key, w in workers.items()}
        per_member = [m.read(tasks[id(m.worker)].result()) for m in self.members]
        items = []
        for i, first in enumerate(per_member[0].items):
            rewards = {s.model: s.items[i].reward for s in per_member}
            values = list(rewards.values())
            items.append(
                EnsembleItemScore(
                    reward=self.aggregate(values),
                    num_tokens=first.num_tokens,
                    truncated=any(s.items[i].truncated for s in per_member),
                    members=rewards,
                    std=std(values),
                )
            )
        raw = [self.aggregate([s.raw[i] for s in per_member]) for i in range(len(items))]
        timings = [t.result().timing for t in tasks.values()]
        timing = Timing(*(max(getattr(t, f) for t in timings) for f in ("tokenize_s", "queue_s", "inference_s")))
        return Scores(items, raw, None, self.name, self.fingerprint), timing


Target = Served | Ensemble


@dataclass
class Registry:
    """Names to models, ensembles and aliases; `default` answers a request that names none."""

    default: str
    models: dict[str, Served] = field(default_factory=dict)
    ensembles: dict[str, Ensemble] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    users: Counter[str] = field(default_factory=Counter)  # requests holding each model, from arrival to answer
    loading: set[str] = field(default_factory=set)  # names the admin API is loading

    @contextmanager
    def hold(self, target: Target) -> Iterator[None]:
        """While a request is answered: a model it resolved to is unloaded only once it is let go."""
        names = [m.name for m in target.members]
        self.users.update(names)
        try:
            yield
        finally:
            self.users.subtract(names)

    async def released(self, name: str, timeout: float) -> None:
        """Waits until no request holds `name` (it is no longer resolvable), at most `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while self.users[name] > 0:
                await asyncio.sleep(0.01)

    def users_of(self, name: str) -> list[str]:
        """What names `name` and would break without it: ensembles, aliases, the default."""
        found = [
            f"ensemble {e}" for e, ensemble in self.ensembles.items() if name in [m.name for m in ensemble.members]
        ]
        found += [f"alias {a}" for a, target in self.aliases.items() if target == name]
        return found + (["the default"] if self.default == name else [])

    @property
    def names(self) -> list[str]:
        """Every name a request may give: models, ensembles, aliases (as /v1/models lists them)."""
        return [*self.models, *self.ensembles, *self.aliases]

    def resolve(self, name: str | None) -> Target:
        wanted = self.default if name is None else name
        wanted = self.aliases.get(wanted, wanted)
        target = self.models.get(wanted) or self.ensembles.get(wanted)
        if target is None:
            served = sorted(self.names)
            raise ServiceError(ErrorType.model_not_found, f"model {name!r} is not served (served: {served})", "model")
        return target

    @property
    def workers(self) -> list[Worker]:
        """Each model thread once (members of a shared-base model share one)."""
        return list({id(m.worker): m.worker for m in self.models.values()}.values())

    @property
    def single(self) -> bool:
        return len(self.models) == 1 and not self.ensembles

    def card(self, name: str) -> ModelCard:
        """What /v1/models says of `name`: vLLM's fields, with our fingerprint, format, dtype and state."""
        if name in self.aliases:
            return self.card(self.aliases[name]).model_copy(
                update={"id": name, "kind": "alias", "root": self.aliases[name]}
            )
        if name in self.ensembles:
            ensemble = self.ensembles[name]
            cards = [self.card(m.name) for m in ensemble.members]
            states = {c.state for c in cards}
            return ModelCard(
                id=name,
                created=ensemble.created,
                root=f"ensemble of {', '.join(c.id for c in cards)}",
                max_model_len=min(c.max_model_len for c in cards),
                kind="ensemble",
                fingerprint=ensemble.fingerprint,
                state="failed" if "failed" in states else "stopping" if "stopping" in states else "ready",
                members=[c.id for c in cards],
                aggregate=ensemble.aggregate.describe(),
            )
        served = self.models[name]
        worker = served.worker
        return ModelCard(
            id=name,
            created=served.created,
            root=str(served.path),
            max_model_len=worker.model.max_length,
            fingerprint=served.fingerprint,
            format=served.info.format,
            dtype=served.info.dtype,
            state="failed" if worker.failure else "ready" if worker.ready else "stopping",
        )
