"""The admin API: load and unload models and re-point aliases while the server works, behind `REWARD_ADMIN_KEYS`
(checked in `app.server.auth`; off without them).

A hot swap is `POST /admin/models` (the new model loads beside the old, is warmed and probed), `PUT
/admin/aliases/{alias}` (one assignment on the event loop: a request resolves its model once, on arrival, so each is
answered wholly by the old model or wholly by the new), then `DELETE /admin/models/{old}`, which waits for every
request that resolved to the old model, stops its thread and frees it."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.engine.memory import Trimmer
from app.model.checkpoint import CheckpointError
from app.server.errors import ErrorType, ServiceError, openapi_responses
from app.server.models_file import ModelEntry
from app.server.registry import Registry
from app.server.startup import serve_model
from app.server.vllm import ModelCard

log = logging.getLogger(__name__)
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
ERRORS = openapi_responses(
    ErrorType.unauthorized, ErrorType.forbidden, ErrorType.model_not_found, ErrorType.conflict, ErrorType.not_ready
)
admin_router = APIRouter(prefix="/admin", tags=["admin"])
WEIGHTS = re.compile(r".*\.(safetensors|bin|pt|pth|gguf)$")


class LoadModel(ModelEntry):
    """`{"name", "path"}` and any per-model setting a models file may give."""

    name: Name


class PointAlias(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a served model or ensemble")


class Unloaded(BaseModel):
    unloaded: str
    waited_s: float = Field(description="how long its admitted requests took to finish")


def _registry(request: Request) -> Registry:
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise ServiceError(ErrorType.not_ready, "start-up has not finished")
    if getattr(request.app.state, "replicated", False):
        raise ServiceError(
            ErrorType.conflict,
            "under Ray Serve each replica holds its own models: change them by redeploying with a new models file",
        )
    return registry


def weights_bytes(path: Path) -> int:
    """The checkpoint's weight files (a packaged backbone's are counted where they are converted: 0 here)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and WEIGHTS.match(f.name))


def free_bytes(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device if ":" in device else "cuda"))[0])
    with open("/proc/meminfo") as info:  # MemAvailable: what can be allocated without swapping
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) * 1024


@admin_router.post("/models", status_code=201, responses=ERRORS | openapi_responses(ErrorType.insufficient_memory))
async def load(body: LoadModel, request: Request) -> ModelCard:
    """Load a model beside those served (409 if the name is taken; 507 when its weights, with half again for
    loading, do not fit in free memory). It answers once warm; until then it is not resolvable."""
    registry = _registry(request)
    if body.name in registry.names:
        raise ServiceError(ErrorType.conflict, f"{body.name!r} is already served", "name")
    if body.name in registry.loading:
        raise ServiceError(ErrorType.conflict, f"{body.name!r} is already loading", "name")
    try:
        settings = body.settings(body.name, request.app.state.settings)
    except ValueError as exc:
        raise ServiceError(ErrorType.validation_error, str(exc), "body") from None
    if not settings.model_path.exists():
        raise ServiceError(ErrorType.validation_error, f"{settings.model_path} does not exist", "path")
    device = "cuda" if settings.device == "auto" and torch.cuda.is_available() else settings.device
    need, free = int(1.5 * weights_bytes(settings.model_path)), free_bytes(device)
    if need > free:
        raise ServiceError(
            ErrorType.insufficient_memory,
            f"loading {settings.model_path} needs about {need / 2**30:.1f} GiB on {device}; "
            f"{free / 2**30:.1f} GiB are free",
        )
    registry.loading.add(body.name)
    try:
        served = await serve_model(
            request.app, body.name, settings, None, lambda stage: log.info("admin: %s: %s", body.name, stage)
        )
    except (CheckpointError, ValueError, OSError) as exc:
        raise ServiceError(ErrorType.validation_error, f"{settings.model_path}: {exc}", "path") from None
    finally:
        registry.loading.discard(body.name)
    registry.models[body.name] = served
    log.info("admin: loaded %s from %s (fingerprint %s)", body.name, settings.model_path, served.fingerprint)
    return registry.card(body.name)


@admin_router.delete("/models/{name}", responses=ERRORS)
async def unload(name: str, request: Request) -> Unloaded:
    """Stop serving `name` (409 while an ensemble, an alias or the default names it): new requests get 404 at once,
    those that resolved to it finish, then its thread stops and its memory is freed."""
    registry = _registry(request)
    if name not in registry.models:
        raise ServiceError(ErrorType.model_not_found, f"model {name!r} is not served", "name")
    if users := registry.users_of(name):
        raise ServiceError(ErrorType.conflict, f"{name!r} is still used by {', '.join(users)}", "name")
    served = registry.models.pop(name)
    began = asyncio.get_running_loop().time()
    settings = request.app.state.settings
    try:
        await registry.released(name, settings.graceful_shutdown_s)
    except TimeoutError:
        log.warning("admin: unloading %s: requests still held it after %.0f s", name, settings.graceful_shutdown_s)
    if served.worker not in registry.workers:  # a shared base's worker stops with its last member
        await served.worker.stop(settings.graceful_shutdown_s)
        request.app.state.workers.remove(served.worker)
    del served
    await asyncio.to_thread(_free)
    waited = round(asyncio.get_running_loop().time() - began, 3)
    log.info("admin: unloaded %s after %.1f s", name, waited)
    return Unloaded(unloaded=name, waited_s=waited)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    Trimmer(interval=0).idle()


@admin_router.put("/aliases/{alias}", responses=ERRORS)
async def point(alias: Name, body: PointAlias, request: Request) -> ModelCard:
    """Point `alias` at a model or ensemble, atomically: the next request that names it gets the new target."""
    registry = _registry(request)
    if alias in registry.models or alias in registry.ensembles:
        raise ServiceError(ErrorType.conflict, f"{alias!r} is a model or ensemble, not an alias", "alias")
    if body.model not in registry.models and body.model not in registry.ensembles:
        raise ServiceError(ErrorType.model_not_found, f"{body.model!r} is not a served model or ensemble", "model")
    registry.aliases[alias] = body.model
    log.info("admin: alias %s -> %s", alias, body.model)
    return registry.card(alias)


@admin_router.delete("/aliases/{alias}", responses=ERRORS)
async def drop(alias: str, request: Request) -> dict[str, str]:
    """Stop resolving `alias` (409 while it is the default: requests naming no model would have none)."""
    registry = _registry(request)
    if alias not in registry.aliases:
        raise ServiceError(ErrorType.model_not_found, f"{alias!r} is not an alias", "alias")
    if registry.default == alias:
        raise ServiceError(ErrorType.conflict, f"{alias!r} is the default", "alias")
    del registry.aliases[alias]
    log.info("admin: alias %s removed", alias)
    return {"removed": alias}
