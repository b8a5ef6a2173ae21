"""The ASGI app: `create_app(settings)` for tests and the CLI, `app` for `uvicorn app.server.main:app`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.engine.offline import served_fingerprint
from app.engine.worker import Worker
from app.model.checkpoint import Normalization
from app.model.loading import load_reward_model
from app.model.reward_model import RewardModel
from app.server.errors import install_error_handlers
from app.server.metrics import Metrics
from app.server.middleware import RequestContext
from app.server.openrlhf import QueryReader
from app.server.routes import Served, open_router, router
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def load_model(settings: Settings) -> RewardModel:
    """Loads on a thread that then exits, so that it leaves no OpenMP thread team behind (see `Worker.start`)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model") as passing:
        return passing.submit(
            load_reward_model,
            settings.model_path,
            dtype=settings.dtype,
            device=settings.device,
            max_length=settings.max_length,
            head_index=settings.head_index,
            trust_remote_code=settings.trust_remote_code,
            cache_dir=settings.cache_dir,
            device_map=settings.device_map,
        ).result()


def normalization_in_force(settings: Settings, model: RewardModel) -> Normalization | None:
    """Decided once at start-up; every route reports this one. The settings' mean/std override the checkpoint's."""
    if not settings.normalize:
        return None
    stored = model.info.checkpoint_normalization
    mean = settings.reward_mean if settings.reward_mean is not None else stored and stored.mean
    std = settings.reward_std if settings.reward_std is not None else stored and stored.std
    if mean is None or std is None:
        raise ValueError(
            "REWARD_NORMALIZE is on but neither the settings (REWARD_REWARD_MEAN/STD) nor the checkpoint give mean/std"
        )
    return Normalization(mean=mean, std=std)


def create_app(
    settings: Settings | None = None,
    model: RewardModel | None = None,
    on_model_death: Callable[[], None] | None = None,
) -> FastAPI:
    """`model` lets tests share one loaded checkpoint across apps; the server loads `settings.model_path`.
    `on_model_death`: how the process ends once its model thread died (a server that cannot score must exit for
    its container to be restarted); None keeps it up with /health at 503 (tests, Ray Serve's health check)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading errors propagate: uvicorn exits non-zero with the CheckpointError naming the file.
        loaded = model or await asyncio.to_thread(load_model, settings)
        normalization = normalization_in_force(settings, loaded)
        worker = Worker(loaded, settings, app.state.metrics, on_death=on_model_death)
        await worker.start()  # measures how the model runs plans, on its own thread
        fingerprint = served_fingerprint(loaded, normalization.model_dump() if normalization else None)
        model_id = settings.served_model_name or str(settings.model_path)
        app.state.served = Served(
            normalization, fingerprint, QueryReader.for_encoder(loaded.encoder), model_id, int(time.time())
        )
        app.state.worker = worker
        log.info("ready: %s (fingerprint %s)", settings.model_path, fingerprint)
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(
        title="reward-server",
        summary="Batched reward-model scoring for RLHF trainers",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(open_router)
    app.add_middleware(RequestContext, metrics=app.state.metrics, settings=settings)
    return app


def _terminate() -> None:
    """Plain `uvicorn app.server.main:app`: SIGTERM to itself, so uvicorn shuts down and the process exits."""
    os.kill(os.getpid(), signal.SIGTERM)


app = create_app(on_model_death=_terminate)
