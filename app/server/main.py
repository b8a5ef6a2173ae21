"""The ASGI app: `create_app(settings)` for tests and the CLI, `app` for `uvicorn app.server.main:app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.model.reward_model import RewardModel
from app.server.admin import admin_router
from app.server.auth import DOCS_ASSETS
from app.server.errors import install_error_handlers
from app.server.metrics import Metrics
from app.server.middleware import RequestContext
from app.server.monitor import Monitor
from app.server.routes import open_router, router
from app.server.startup import Startup, start
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    model: RewardModel | None = None,
    on_model_death: Callable[[], None] | None = None,
    wait: bool = False,
) -> FastAPI:
    """`model` lets tests share one loaded checkpoint across apps; the server loads `settings.model_path`.
    `on_model_death`: how the process ends once start-up failed or its model thread died (a server that cannot
    score must exit for its container to be restarted); None keeps it up with /health or /ready at 503 (tests, Ray
    Serve's health check). `wait`: the lifespan returns once the model serves (Ray Serve, whose proxy is the port)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The port opens now: start-up runs beside it (/health 200, /ready 503 with its stage), unless `wait`.
        app.state.startup.task = task = asyncio.create_task(start(app, model, on_failure=on_model_death))
        if wait:
            await app.state.startup.finished()
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.gather(*(worker.stop() for worker in app.state.workers))

    app = FastAPIOffline(  # /docs and /redoc with their scripts served from the package: they work offline
        static_url=DOCS_ASSETS,
        title="reward-server",
        summary="Batched reward-model scoring for RLHF trainers",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.monitor = (
        Monitor(settings.monitor_window, settings.monitor_runs, settings.monitor_baseline, app.state.metrics)
        if settings.monitor
        else None
    )
    app.state.startup = Startup()
    app.state.workers = []  # every worker start-up started, stopped with the app
    app.state.on_model_death = on_model_death
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(open_router)
    app.include_router(admin_router)
    app.add_middleware(RequestContext, metrics=app.state.metrics, settings=settings)
    return app


def _terminate() -> None:
    """Plain `uvicorn app.server.main:app`: SIGTERM to itself, so uvicorn shuts down and the process exits."""
    os.kill(os.getpid(), signal.SIGTERM)


app = create_app(on_model_death=_terminate)
