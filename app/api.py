"""Routes only: each handler parses its schema, makes one call through `_scored` and builds the response."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.errors import ErrorType, ServiceError
from app.ml.recipe import ScoringInput
from app.schemas import (
    CompareRequest,
    CompareResponse,
    ErrorBody,
    GetRewardRequest,
    GetRewardResponse,
    Health,
    Info,
    RankRequest,
    RankResponse,
    Ready,
    ScoreRequest,
    ScoreResponse,
    check_limits,
)
from app.settings import Settings
from app.worker import ItemResult, Worker

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "missing or wrong API key",
        413: "too many items, or body too large",
        422: "invalid input; `param` says where",
        429: "queue full; retry after `Retry-After` seconds",
        500: "the model failed on this request's items",
        503: "not ready (loading or shutting down)",
        504: "not scored within the request's deadline",
    }.items()
}


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Bearer keys, compared in constant time; no keys configured means open."""
    if not settings.api_keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    valid = scheme.lower() == "bearer" and any(
        hmac.compare_digest(given.encode(), key.encode()) for key in settings.api_keys
    )
    if not valid:
        raise ServiceError(
            ErrorType.unauthorized,
            "a valid API key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_worker(request: Request, settings: SettingsDep) -> Worker:
    worker: Worker | None = getattr(request.app.state, "worker", None)
    if worker is None or not worker.ready:
        raise ServiceError(
            ErrorType.not_ready, "the model is not ready", headers={"Retry-After": str(settings.retry_after_seconds)}
        )
    return worker


WorkerDep = Annotated[Worker, Depends(get_worker)]
router = APIRouter(dependencies=[Depends(require_api_key)])
open_router = APIRouter()


def _deadline(request: Request, settings: Settings) -> float:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return settings.request_timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= settings.max_request_timeout_s:
        raise ServiceError(
            ErrorType.validation_error,
            f"X-Request-Timeout must be seconds in (0, {settings.max_request_timeout_s:g}]",
            param="X-Request-Timeout",
        )
    return value


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _scored(
    request: Request, response: Response, worker: Worker, body: Any, inputs: list[ScoringInput]
) -> list[ItemResult]:
    """The one path every scoring route takes: limits, deadline, the worker call, dropping the work of a client
    that went away, timing headers."""
    settings = worker.settings
    check_limits(body, settings.max_text_chars, settings.max_messages)
    task = asyncio.ensure_future(worker.score(inputs, _deadline(request, settings)))
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():  # the client disconnected: its queued items are skipped, not computed
        task.cancel()
        raise ServiceError(ErrorType.client_closed, "the client closed the connection before its result")
    scored = task.result()
    t = scored.timing
    response.headers["x-tokenize-time-ms"] = f"{t.tokenize_s * 1000:.1f}"
    response.headers["x-queue-time-ms"] = f"{t.queue_s * 1000:.1f}"
    response.headers["x-inference-time-ms"] = f"{t.inference_s * 1000:.1f}"
    return scored.results


@router.post("/score", responses=ERRORS)
async def score(body: ScoreRequest, request: Request, response: Response, worker: WorkerDep) -> ScoreResponse:
    """Rewards for prompt/response items (or whole conversations), aligned with `items`."""
    results = await _scored(request, response, worker, body, [item.to_input() for item in body.items])
    return ScoreResponse.build(results, worker.model.info["fingerprint"], worker.normalization)


@router.post("/compare", responses=ERRORS)
async def compare(body: CompareRequest, request: Request, response: Response, worker: WorkerDep) -> CompareResponse:
    """Bradley-Terry P(response_a preferred to response_b) per pair, with both rewards."""
    inputs = [side for pair in body.pairs for side in pair.to_inputs()]
    results = await _scored(request, response, worker, body, inputs)
    return CompareResponse.build(results, worker.model.info["fingerprint"])


@router.post("/rank", responses=ERRORS)
async def rank(body: RankRequest, request: Request, response: Response, worker: WorkerDep) -> RankResponse:
    """GRPO/RLOO groups: rewards, group mean/std, normalized advantages, leave-one-out baselines, ranks."""
    inputs = [x for group in body.groups for x in group.to_inputs()]
    results = await _scored(request, response, worker, body, inputs)
    return RankResponse.build(body, results, worker.model.info["fingerprint"], worker.normalization)


@router.post("/get_reward", responses=ERRORS)
async def get_reward(
    body: GetRewardRequest, request: Request, response: Response, worker: WorkerDep
) -> GetRewardResponse:
    """OpenRLHF's remote reward model protocol (`--remote_rm_url http://host:port/get_reward`)."""
    inputs = body.to_inputs(worker.model.encoder.special_tokens)
    results = await _scored(request, response, worker, body, inputs)
    return GetRewardResponse.build(results, worker.normalization)


@router.get("/info", responses=ERRORS)
async def info(worker: WorkerDep) -> Info:
    """What is served and how it reads a sequence; `fingerprint` is also in every scoring response."""
    s = worker.settings
    limits = {
        "max_items_per_request": s.max_items_per_request,
        "max_queue_items": s.max_queue_items,
        "max_batch_tokens": s.max_batch_tokens,
        "max_batch_size": s.max_batch_size,
        "pad_to_multiple_of": s.pad_to_multiple_of,
        "max_body_bytes": s.max_body_bytes,
        "max_text_chars": s.max_text_chars,
        "max_messages": s.max_messages,
        "request_timeout_s": s.request_timeout_s,
    }
    return Info(**worker.model.info, shares_prefixes=worker.shares_prefixes, limits=limits)


@open_router.get("/health")
async def health() -> Health:
    """The process is alive (the model may still be loading)."""
    return Health()


@open_router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request, settings: SettingsDep) -> Any:
    """200 once the model is loaded and warmed up; 503 before, and while shutting down."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    state = Ready(ready=bool(worker and worker.ready), queued_items=worker.queued_items if worker else 0)
    if state.ready:
        return state
    return JSONResponse(state.model_dump(), status_code=503, headers={"Retry-After": str(settings.retry_after_seconds)})


@open_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format; behind the API key when keys are set and `protect_metrics` is on."""
    if settings.protect_metrics:
        require_api_key(request, settings)
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
