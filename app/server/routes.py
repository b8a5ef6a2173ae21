"""Routes only: each handler parses its schema, makes one call through `_scored` and builds the response."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from app.engine.errors import DeadlineExceeded, EngineError
from app.engine.results import Timing
from app.model.recipe import Item
from app.model.steps import StepAggregate
from app.server import limits
from app.server.decode import DecodedRoute
from app.server.errors import ErrorType, ServiceError, from_engine, openapi_responses
from app.server.monitor import Monitor, run_of
from app.server.monitor_page import page, runs_html
from app.server.openrlhf import GetRewardRequest, GetRewardResponse
from app.server.registry import Registry, Target
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
)
from app.server.scores import Scores
from app.server.signals import observe
from app.server.vllm import ClassifyRequest, ClassifyResponse, ModelList
from app.settings import Settings

ERRORS = openapi_responses(  # what a scoring route can answer besides 200
    ErrorType.unauthorized,
    ErrorType.payload_too_large,
    ErrorType.validation_error,
    ErrorType.overloaded,
    ErrorType.backend_error,
    ErrorType.not_ready,
    ErrorType.timeout,
    ErrorType.model_not_found,
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_registry(request: Request) -> Registry:
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None or not all(w.ready for w in registry.workers):
        raise ServiceError(ErrorType.not_ready, "the models are not ready")
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
router = APIRouter(route_class=DecodedRoute)  # API keys: checked in the middleware, before the body is read
open_router = APIRouter()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _scored(
    request: Request,
    response: Response,
    target: Target,
    count: int,
    convert: Callable[[], list[Item]],
    field: str = "items",
    groups: list[int] | None = None,
    aggregate: StepAggregate | None = None,
) -> Scores:
    """The one path every scoring route takes: the item limit, the deadline (counted from the request's arrival),
    the conversion to items off the event loop, the model's (or each ensemble member's) worker call, the work of a
    client that went away or of a cancelled handler dropped, an item's error named in the body (`field`:
    `input[2]`), the normalization in force applied, a process reward model's `aggregate` of each item's steps, the
    monitor told (`groups`: /rank's sizes), timing headers."""
    settings: Settings = request.app.state.settings
    limits.check_items(count, settings)
    timeout = limits.deadline(request.headers.get("x-request-timeout"), settings)
    arrived: float = getattr(request.state, "arrived", time.perf_counter())
    task = asyncio.ensure_future(_converted_and_scored(target, convert, arrived + timeout, timeout))
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        with request.app.state.registry.hold(target):  # an unload waits for it
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # a handler cancelled here (Ray Serve cancels it when its client leaves) cancels its items too
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():  # the client disconnected: its queued items are skipped, not computed
        raise ServiceError(ErrorType.client_closed, "the client closed the connection before its result")
    try:
        scores, t, inputs = task.result()
    except EngineError as exc:
        raise from_engine(exc, field) from exc
    except ExceptionGroup as group:  # an ensemble: its first member's failure speaks for it
        first = group.exceptions[0]
        if isinstance(first, EngineError):
            raise from_engine(first, field) from group
        raise
    scores = scores.aggregated(aggregate)
    if (monitor := request.app.state.monitor) is not None:
        scores = _monitored(monitor, request, response, target, scores, inputs, groups)
    response.headers["x-tokenize-time-ms"] = f"{t.tokenize_s * 1000:.1f}"
    response.headers["x-queue-time-ms"] = f"{t.queue_s * 1000:.1f}"
    response.headers["x-inference-time-ms"] = f"{t.inference_s * 1000:.1f}"
    return scores


async def _converted_and_scored(
    target: Target, convert: Callable[[], list[Item]], deadline: float, timeout: float
) -> tuple[Scores, Timing, list[Item]]:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        inputs = await asyncio.to_thread(convert)
        remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise DeadlineExceeded(f"not scored within the request's deadline of {timeout:g} s (parsing counts)")
    return (*await target.score(inputs, remaining, timeout), inputs)


def _monitored(
    monitor: Monitor,
    request: Request,
    response: Response,
    target: Target,
    scores: Scores,
    inputs: list[Item],
    groups: list[int] | None,
) -> Scores:
    """The request's items into its run's window; the run's warnings onto the response (body and header)."""
    began = time.perf_counter()
    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or None
    run = run_of(request.headers.get("x-run-id"), request.query_params.get("run"), key)
    group_of: list[int | None] = [None] * len(inputs)
    if groups:
        first, at = monitor.next_group(run, len(groups)), 0
        for g, size in enumerate(groups):
            group_of[at : at + size] = [first + g] * size
            at += size
    distances = scores.distances or [None] * len(inputs)
    observed = [
        observe(item, raw, scored.num_tokens, scored.truncated, group, distance)
        for item, raw, scored, group, distance in zip(
            inputs, scores.raw, scores.items, group_of, distances, strict=True
        )
    ]
    warnings = monitor.record(run, observed, target.members[0].info.monitor_reference)
    monitor.spent(time.perf_counter() - began)
    if not warnings:
        return scores
    response.headers["x-reward-warnings"] = " | ".join(warnings)
    return dataclasses.replace(scores, warnings=list(warnings))


@router.post("/score", responses=ERRORS)
async def score(body: ScoreRequest, request: Request, response: Response, registry: RegistryDep) -> ScoreResponse:
    """Rewards for prompt/response items (or whole conversations), aligned with `items`."""
    target = registry.resolve(body.model)
    _reads_steps(target, body.aggregate, body.stepped())
    scores = await _scored(request, response, target, body.size(), body.to_inputs, aggregate=body.aggregate)
    return ScoreResponse.build(scores)


def _reads_steps(target: Target, aggregate: StepAggregate | None, stepped: str | None) -> None:
    """`steps` and `aggregate` are a process reward model's: another model refuses them (422, naming the field)."""
    if (aggregate is None and stepped is None) or all(m.readout.steps is not None for m in target.members):
        return
    param = stepped or "aggregate"
    raise ServiceError(ErrorType.validation_error, f"{target.name} is not a process reward model", param=param)


@router.post("/compare", responses=ERRORS)
async def compare(body: CompareRequest, request: Request, response: Response, registry: RegistryDep) -> CompareResponse:
    """Bradley-Terry P(response_a preferred to response_b) per pair, with both rewards."""
    target = registry.resolve(body.model)
    return CompareResponse.build(await _scored(request, response, target, body.size(), body.to_inputs))


@router.post("/rank", responses=ERRORS)
async def rank(body: RankRequest, request: Request, response: Response, registry: RegistryDep) -> RankResponse:
    """GRPO/RLOO groups: rewards, group mean/std, normalized advantages, leave-one-out baselines, ranks."""
    target = registry.resolve(body.model)
    if body.probabilities:
        limits.check_probabilities([group.size for group in body.groups], request.app.state.settings)
    _reads_steps(target, body.aggregate, body.stepped())
    sizes = [group.size for group in body.groups]
    scores = await _scored(
        request, response, target, body.size(), body.to_inputs, groups=sizes, aggregate=body.aggregate
    )
    return RankResponse.build(body, scores)


@router.post("/get_reward", responses=ERRORS)
@router.post("/models/{name}/get_reward", responses=ERRORS)
async def get_reward(
    body: GetRewardRequest, request: Request, response: Response, registry: RegistryDep, name: str | None = None
) -> GetRewardResponse:
    """OpenRLHF's remote reward model protocol (`--remote_rm_url http://host:port/get_reward`); its body is fixed,
    so another model is named in the path: `/models/{name}/get_reward`."""
    target = registry.resolve(name)
    read_as: list[str] = []

    def convert() -> list[Item]:
        names, inputs = body.to_inputs(target.reader)
        read_as.extend(names)
        return inputs

    scores = await _scored(request, response, target, len(body.query), convert, field="query")
    return GetRewardResponse.build(scores, read_as, target.reader.readings)


@router.post("/classify", responses=ERRORS)
@router.post("/v1/classify", responses=ERRORS)
async def classify(
    body: ClassifyRequest, request: Request, response: Response, registry: RegistryDep
) -> ClassifyResponse:
    """vLLM's classify API: `probs` per input (sigmoid of the reward; `use_activation: false` for the reward)."""
    target = _vllm_target(registry, body.model)
    scores = await _scored(request, response, target, body.size(), body.to_inputs, field="input")
    return ClassifyResponse.build(body, scores)


@router.post("/pooling", responses=ERRORS)
async def pooling(
    body: ClassifyRequest, request: Request, response: Response, registry: RegistryDep
) -> ClassifyResponse:
    """vLLM's pooling API with `task: classify` (the default): the same values as /classify, in pooling's shape."""
    target = _vllm_target(registry, body.model)
    scores = await _scored(request, response, target, body.size(), body.to_inputs, field="input")
    return ClassifyResponse.build(body, scores, pooling=True, steps=target.members[0].readout.steps)


def _vllm_target(registry: Registry, name: str | None) -> Target:
    """A server of one model answers whatever name a vLLM client was configured with, as it always has."""
    return registry.resolve(None if registry.single and name not in registry.aliases else name)


@router.get("/monitor", responses=ERRORS)
async def monitor(request: Request) -> dict[str, Any]:
    """The reward-hacking monitor: per run, its windows' signals and the warnings in force (README: Watching for
    reward hacking); `{"runs": {}}` with the monitor off."""
    watched: Monitor | None = request.app.state.monitor
    return watched.snapshot() if watched is not None else {"window": None, "runs": {}}


@router.get("/monitor/ui", response_class=HTMLResponse, responses=ERRORS)
async def monitor_ui(request: Request, part: Literal["page", "runs"] = "page") -> HTMLResponse:
    """The monitor as a live page (charts per run, thresholds drawn); `part=runs`: the part the page refreshes."""
    snapshot = await monitor(request)
    return HTMLResponse(runs_html(snapshot) if part == "runs" else page(snapshot))


@router.get("/v1/models", responses=ERRORS)
async def models(registry: RegistryDep) -> ModelList:
    """Every served model, ensemble and alias, as vLLM lists models, with fingerprints, formats, dtypes, states."""
    return ModelList(data=[registry.card(name) for name in registry.names])


@router.get("/info", responses=ERRORS)
async def info(registry: RegistryDep, model: str | None = None) -> Info:
    """What the default model (or `?model=`) is and how it reads a sequence; `fingerprint` is also in every scoring
    response. An ensemble's: its first member's, with the ensemble's fingerprint."""
    target = registry.resolve(model)
    served = target.members[0]
    worker = served.worker
    return Info(
        **served.info.model_dump(),
        normalization=served.normalization,
        fingerprint=target.fingerprint,
        kernels=worker.model.prepared,
        limits=limits.described(worker.settings),
    )


@open_router.get("/health", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}})
async def health(request: Request) -> Any:
    """The process is up (the model may still be loading: see /ready); 503 once start-up failed or the model thread
    died: restart it."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    died = [f"{s.name}: {s.worker.failure}" for s in (registry.models.values() if registry else []) if s.worker.failure]
    failure = request.app.state.startup.failure or ("; ".join(died) if died else None)
    if failure is not None:
        return JSONResponse(Health(status="failed", failure=failure).model_dump(), status_code=503)
    return Health()


@open_router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request, settings: SettingsDep) -> Any:
    """200 once every model is loaded and warmed up; 503 before (with the start-up stage), and while shutting down."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    workers = registry.workers if registry else []
    ready = bool(workers) and all(w.ready for w in workers)
    startup = request.app.state.startup
    state = Ready(
        ready=ready,
        queued_items=sum(w.queued_items for w in workers),
        status="stopping" if startup.status == "ready" and not ready else startup.status,
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
