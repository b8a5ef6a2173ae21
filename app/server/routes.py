"""Routes only: each handler parses its schema, makes one call through `_scored` and builds the response."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from app.engine.errors import DeadlineExceeded, EngineError
from app.engine.results import Scored
from app.engine.worker import Worker
from app.model.checkpoint import Normalization
from app.model.recipe import Item
from app.server import limits
from app.server.decode import DecodedRoute
from app.server.errors import ErrorType, ServiceError, from_engine, openapi_responses
from app.server.openrlhf import GetRewardRequest, GetRewardResponse, QueryReader
from app.server.schemas import (
    CompareRequest,
    CompareResponse,
    Health,
    Info,
    RankRequest,
    RankResponse,
    Ready,
    ScoreRequest,
    ScoreResponse,
    Scores,
)
from app.server.vllm import ClassifyRequest, ClassifyResponse, ModelCard, ModelList
from app.settings import Settings

ERRORS = openapi_responses(  # what a scoring route can answer besides 200
    ErrorType.unauthorized,
    ErrorType.payload_too_large,
    ErrorType.validation_error,
    ErrorType.overloaded,
    ErrorType.backend_error,
    ErrorType.not_ready,
    ErrorType.timeout,
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_worker(request: Request) -> Worker:
    worker: Worker | None = getattr(request.app.state, "worker", None)
    if worker is None or not worker.ready:
        raise ServiceError(ErrorType.not_ready, "the model is not ready")
    return worker


@dataclass(frozen=True)
class Served:
    """What start-up decided and every route reports: the normalization in force, the scoring fingerprint, how
    OpenRLHF queries are read and the id the vLLM-style routes report."""

    normalization: Normalization | None
    fingerprint: str
    reader: QueryReader
    model_id: str
    created: int  # when it started serving, as /v1/models reports it


def get_served(request: Request) -> Served:
    return request.app.state.served  # type: ignore[no-any-return]


WorkerDep = Annotated[Worker, Depends(get_worker)]
ServedDep = Annotated[Served, Depends(get_served)]
router = APIRouter(route_class=DecodedRoute)  # API keys: checked in the middleware, before the body is read
open_router = APIRouter()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _scored(
    request: Request,
    response: Response,
    worker: Worker,
    count: int,
    convert: Callable[[], list[Item]],
    field: str = "items",
) -> Scores:
    """The one path every scoring route takes: the item limit, the deadline (counted from the request's arrival),
    the conversion to items off the event loop, the worker call, the work of a client that went away or of a
    cancelled handler dropped, an item's error named in the body (`field`: `input[2]`), the normalization in force
    applied, timing headers."""
    settings = worker.settings
    limits.check_items(count, settings)
    timeout = limits.deadline(request.headers.get("x-request-timeout"), settings)
    arrived: float = getattr(request.state, "arrived", time.perf_counter())
    task = asyncio.ensure_future(_converted_and_scored(worker, convert, arrived + timeout, timeout))
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # a handler cancelled here (Ray Serve cancels it when its client leaves) cancels its items too
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():  # the client disconnected: its queued items are skipped, not computed
        raise ServiceError(ErrorType.client_closed, "the client closed the connection before its result")
    try:
        scored = task.result()
    except EngineError as exc:
        raise from_engine(exc, field) from exc
    t = scored.timing
    response.headers["x-tokenize-time-ms"] = f"{t.tokenize_s * 1000:.1f}"
    response.headers["x-queue-time-ms"] = f"{t.queue_s * 1000:.1f}"
    response.headers["x-inference-time-ms"] = f"{t.inference_s * 1000:.1f}"
    return Scores.of(scored.results, request.app.state.served.normalization)


async def _converted_and_scored(
    worker: Worker, convert: Callable[[], list[Item]], deadline: float, timeout: float
) -> Scored:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        inputs = await asyncio.to_thread(convert)
        remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise DeadlineExceeded(f"not scored within the request's deadline of {timeout:g} s (parsing counts)")
    return await worker.score(inputs, remaining, timeout)


@router.post("/score", responses=ERRORS)
async def score(
    body: ScoreRequest, request: Request, response: Response, worker: WorkerDep, served: ServedDep
) -> ScoreResponse:
    """Rewards for prompt/response items (or whole conversations), aligned with `items`."""
    scores = await _scored(request, response, worker, body.size(), body.to_inputs)
    return ScoreResponse.build(scores, served.fingerprint)


@router.post("/compare", responses=ERRORS)
async def compare(
    body: CompareRequest, request: Request, response: Response, worker: WorkerDep, served: ServedDep
) -> CompareResponse:
    """Bradley-Terry P(response_a preferred to response_b) per pair, with both rewards."""
    scores = await _scored(request, response, worker, body.size(), body.to_inputs)
    return CompareResponse.build(scores, served.fingerprint)


@router.post("/rank", responses=ERRORS)
async def rank(
    body: RankRequest, request: Request, response: Response, worker: WorkerDep, served: ServedDep
) -> RankResponse:
    """GRPO/RLOO groups: rewards, group mean/std, normalized advantages, leave-one-out baselines, ranks."""
    if body.probabilities:
        limits.check_probabilities([len(group.responses) for group in body.groups], worker.settings)
    scores = await _scored(request, response, worker, body.size(), body.to_inputs)
    return RankResponse.build(body, scores, served.fingerprint)


@router.post("/get_reward", responses=ERRORS)
async def get_reward(
    body: GetRewardRequest, request: Request, response: Response, worker: WorkerDep, served: ServedDep
) -> GetRewardResponse:
    """OpenRLHF's remote reward model protocol (`--remote_rm_url http://host:port/get_reward`)."""
    read_as: list[str] = []

    def convert() -> list[Item]:
        names, inputs = body.to_inputs(served.reader)
        read_as.extend(names)
        return inputs

    scores = await _scored(request, response, worker, len(body.query), convert, field="query")
    return GetRewardResponse.build(scores, read_as, served.reader.readings)


@router.post("/classify", responses=ERRORS)
@router.post("/v1/classify", responses=ERRORS)
async def classify(
    body: ClassifyRequest, request: Request, response: Response, worker: WorkerDep, served: ServedDep
) -> ClassifyResponse:
    """vLLM's classify API: `probs` per input (sigmoid of the reward; `use_activation: false` for the reward)."""
    scores = await _scored(request, response, worker, body.size(), body.to_inputs, field="input")
    return ClassifyResponse.build(body, scores, served.model_id)


@router.post("/pooling", responses=ERRORS)
async def pooling(
    body: ClassifyRequest, request: Request, response: Response, worker: WorkerDep, served: ServedDep
) -> ClassifyResponse:
    """vLLM's pooling API with `task: classify` (the default): the same values as /classify, in pooling's shape."""
    scores = await _scored(request, response, worker, body.size(), body.to_inputs, field="input")
    return ClassifyResponse.build(body, scores, served.model_id, pooling=True)


@router.get("/v1/models", responses=ERRORS)
async def models(worker: WorkerDep, served: ServedDep) -> ModelList:
    """The one served model, as vLLM lists it (the id from REWARD_SERVED_MODEL_NAME)."""
    card = ModelCard(
        id=served.model_id,
        created=served.created,
        root=str(worker.settings.model_path),
        max_model_len=worker.model.max_length,
    )
    return ModelList(data=[card])


@router.get("/info", responses=ERRORS)
async def info(worker: WorkerDep, served: ServedDep) -> Info:
    """What is served and how it reads a sequence; `fingerprint` is also in every scoring response."""
    return Info(
        **worker.model.info.model_dump(),
        normalization=served.normalization,
        fingerprint=served.fingerprint,
        kernels=worker.model.prepared,
        limits=limits.described(worker.settings),
    )


@open_router.get("/health", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}})
async def health(request: Request) -> Any:
    """The process is up (the model may still be loading: see /ready); 503 once start-up failed or the model thread
    died: restart it."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    failure = request.app.state.startup.failure or (worker.failure if worker is not None else None)
    if failure is not None:
        return JSONResponse(Health(status="failed", failure=failure).model_dump(), status_code=503)
    return Health()


@open_router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request, settings: SettingsDep) -> Any:
    """200 once the model is loaded and warmed up; 503 before (with the start-up stage), and while shutting down."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    startup = request.app.state.startup
    state = Ready(
        ready=bool(worker and worker.ready),
        queued_items=worker.queued_items if worker else 0,
        status="stopping" if startup.status == "ready" and not (worker and worker.ready) else startup.status,
        stage=startup.stage,
        elapsed_s=startup.elapsed_s,
    )
    if state.ready:
        return state
    return JSONResponse(state.model_dump(), status_code=503, headers={"Retry-After": str(settings.retry_after_seconds)})


@open_router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}}
    | openapi_responses(ErrorType.unauthorized),
)
async def metrics(request: Request) -> Response:
    """Prometheus text format; behind the API key when keys are set and `protect_metrics` is on."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
