"""Start-up, run after the port opens: load, measure, warm up. `/ready` reports the stage it is at until the model
serves; a failure ends it with one line naming the problem (its traceback at debug level)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from fastapi import FastAPI

from app.engine.offline import served_fingerprint
from app.engine.worker import Worker
from app.model.checkpoint import Normalization
from app.model.family import load_shared_base
from app.model.info import ModelInfo
from app.model.loading import load_reward_model
from app.model.reward_model import RewardModel
from app.model.steps import StepRule
from app.server.models_file import ModelsFile
from app.server.openrlhf import QueryReader
from app.server.registry import Ensemble, Registry, Served
from app.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_keywords(settings: Settings) -> dict[str, Any]:
    """`load_reward_model`'s keywords, as the settings give them."""
    return {
        "dtype": settings.dtype,
        "device": settings.device,
        "max_length": settings.max_length,
        "head_index": settings.head_index,
        "attribute_weights": settings.attribute_weights,
        "steps": StepRule.model_validate(settings.steps) if settings.steps else None,
        "trust_remote_code": settings.trust_remote_code,
        "cache_dir": settings.cache_dir,
        "device_map": settings.device_map,
        "probe": settings.monitor,  # the state distance only the monitor reads
    }


def _passing(load: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Loads on a thread that then exits, so that it leaves no OpenMP thread team behind (see `Worker.start`)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model") as passing:
        return passing.submit(load, *args, **kwargs).result()


def load_model(settings: Settings) -> RewardModel:
    return _passing(load_reward_model, settings.model_path, **load_keywords(settings))


def normalization_in_force(settings: Settings, info: ModelInfo) -> Normalization | None:
    """Decided once at start-up; every route reports this one. The settings' mean/std override the checkpoint's."""
    if not settings.normalize:
        return None
    stored = info.checkpoint_normalization
    mean = settings.reward_mean if settings.reward_mean is not None else stored and stored.mean
    std = settings.reward_std if settings.reward_std is not None else stored and stored.std
    if mean is None or std is None:
        raise ValueError(
            "REWARD_NORMALIZE is on but neither the settings (REWARD_REWARD_MEAN/STD) nor the checkpoint give mean/std"
        )
    return Normalization(mean=mean, std=std)


class Startup:
    """Where start-up is: `status` and `stage` for `/ready`, `failure` once it failed. Each stage is one log line
    with the time since the process began starting; the clock stops when start-up ends, so `/ready` then says how
    long it took."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.ended: float | None = None
        self.status: Literal["starting", "ready", "failed"] = "starting"
        self.stage = "starting"
        self.failure: str | None = None
        self.error: Exception | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def elapsed_s(self) -> float:
        return round((self.ended or time.monotonic()) - self.began, 1)

    def end(self, status: Literal["ready", "failed"]) -> None:
        self.status, self.ended = status, time.monotonic()

    def step(self, stage: str) -> None:
        self.stage = stage
        log.info("start-up: %s (%.1f s)", stage, self.elapsed_s)

    async def finished(self) -> None:
        """Waits until the model serves; raises what made start-up fail, as it was raised (a CheckpointError stays
        one, for Ray and tests)."""
        assert self.task is not None, "start-up has not begun (the app's lifespan starts it)"
        await asyncio.shield(self.task)
        if self.error is not None:
            raise self.error


async def start(app: FastAPI, model: RewardModel | None, on_failure: Callable[[], None] | None) -> None:
    """Load each model (unless `model` is given: the one model of the settings), measure its kernels on its model
    thread, then serve them all. A failure is logged as one line (a CheckpointError names its file) and ends the
    process through `on_failure` (None: it stays up, with /ready 503 saying why: tests, Ray, which reports it)."""
    settings: Settings = app.state.settings
    startup: Startup = app.state.startup
    try:
        if settings.models_file is None:
            name = settings.served_model_name or str(settings.model_path)
            registry = Registry(default=name)
            registry.models[name] = await serve_model(app, name, settings, model, startup.step)
        else:
            spec = ModelsFile.read(settings.models_file)
            registry = Registry(default=spec.default or next(iter(spec.models)), aliases=dict(spec.aliases))
            groups = spec.groups(settings)
            for i, names in enumerate(groups, 1):
                own, counter = [spec.settings_of(n, settings) for n in names], f"{', '.join(names)} ({i}/{len(groups)})"
                served = await serve_models(
                    app, names, own, lambda stage, counter=counter: startup.step(f"{counter}: {stage}")
                )
                registry.models.update((s.name, s) for s in served)
            for name, entry in spec.ensembles.items():  # an entry is its own Aggregate
                members = tuple(registry.models[m] for m in entry.members)
                registry.ensembles[name] = Ensemble(name, members, entry, int(time.time()))
        app.state.registry = registry
        startup.end("ready")
        startup.step(f"ready: {', '.join(f'{n} (fingerprint {s.fingerprint})' for n, s in registry.models.items())}")
    except Exception as exc:  # any failure ends start-up the same way
        startup.end("failed")
        startup.failure, startup.error = f"{type(exc).__name__}: {exc}", exc
        startup.stage = f"failed: {exc}"
        log.error("start-up failed after %.1f s: %s", startup.elapsed_s, exc)
        log.debug("start-up failure", exc_info=exc)
        if on_failure is not None:
            on_failure()


async def serve_models(
    app: FastAPI, names: list[str], settings: list[Settings], step: Callable[[str], None]
) -> list[Served]:
    """Models that may share a base (`ModelsFile.groups`): on one worker when their checkpoints do, else each on its
    own."""
    if len(names) > 1:
        step(f"loading {len(names)} members of one base")
        paths = [s.model_path for s in settings]
        fused = await asyncio.to_thread(_passing, load_shared_base, names, paths, **load_keywords(settings[0]))
        if fused is not None:
            return await _serve(app, names, settings, fused, step)
    return [await serve_model(app, name, own, None, step) for name, own in zip(names, settings, strict=True)]


async def serve_model(
    app: FastAPI, name: str, settings: Settings, model: RewardModel | None, step: Callable[[str], None]
) -> Served:
    """One model, from its checkpoint to a warm worker; `step` reports each stage (start-up's, or the admin API's
    log)."""
    if model is None:
        step(f"loading {settings.model_path}")
        model = await asyncio.to_thread(load_model, settings)
    return (await _serve(app, [name], [settings], model, step))[0]


async def _serve(
    app: FastAPI, names: list[str], settings: list[Settings], model: RewardModel, step: Callable[[str], None]
) -> list[Served]:
    """A loaded model on a warm worker, served under each of `names` (several: a shared base's members, each its
    column). A worker started here is stopped by the lifespan, even when a later model fails to load (it is kept
    in `app.state.workers`)."""
    infos = model.members or (model.info,)
    step(f"loaded {model.info.format} checkpoint ({model.info.architecture}, {model.info.dtype}); measuring kernels")
    worker = Worker(model, settings[0], app.state.metrics, on_death=app.state.on_model_death)
    app.state.workers.append(worker)
    await worker.start()  # measures how the model runs plans, on its own thread
    reader = QueryReader.for_encoder(model.encoder)
    served = []
    for k, (name, own, info) in enumerate(zip(names, settings, infos, strict=True)):
        normalization = normalization_in_force(own, info)
        fingerprint = served_fingerprint(model, normalization.model_dump() if normalization else None, info)
        readout = model.readout.column(k) if model.members else model.readout
        log.info("serving %s: %s, fingerprint %s, %s", name, own.model_path, fingerprint, model.prepared.describe())
        created = int(time.time())
        served.append(Served(name, own.model_path, worker, readout, info, normalization, fingerprint, reader, created))
    return served
