"""Routes only: each handler parses its schema, makes one worker call and builds the response."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.errors import ErrorType, ServiceError
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
)
from app.worker import Worker

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        413: "too many items in one request",
        422: "invalid input; `param` says where",
        429: "queue full; retry after `Retry-After` seconds",
        500: "the model failed on this request's batch",
        503: "not ready (loading or shutting down)",
    }.items()
}

router = APIRouter()


def _retry_after(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.settings.retry_after_seconds)}


def get_worker(request: Request) -> Worker:
    worker: Worker | None = getattr(request.app.state, "worker", None)
    if worker is None or not worker.ready:
        raise ServiceError(ErrorType.not_ready, "the model is not ready", headers=_retry_after(request))
    return worker


WorkerDep = Annotated[Worker, Depends(get_worker)]


@router.post("/score", responses=ERRORS)
async def score(body: ScoreRequest, worker: WorkerDep) -> ScoreResponse:
    """Rewards for prompt/response items (or whole conversations), aligned with `items`."""
    results = await worker.score([item.to_input() for item in body.items])
    return ScoreResponse.build(results, worker.model.info["fingerprint"], worker.normalization)


@router.post("/compare", responses=ERRORS)
async def compare(body: CompareRequest, worker: WorkerDep) -> CompareResponse:
    """Bradley-Terry P(response_a preferred to response_b) per pair, with both rewards."""
    results = await worker.score([side for pair in body.pairs for side in pair.to_inputs()])
    return CompareResponse.build(results, worker.model.info["fingerprint"])


@router.post("/rank", responses=ERRORS)
async def rank(body: RankRequest, worker: WorkerDep) -> RankResponse:
    """GRPO/RLOO groups: rewards, group mean/std, normalized advantages, leave-one-out baselines, ranks."""
    results = await worker.score([x for group in body.groups for x in group.to_inputs()])
    return RankResponse.build(body, results, worker.model.info["fingerprint"], worker.normalization)


@router.post("/get_reward", responses=ERRORS)
async def get_reward(body: GetRewardRequest, worker: WorkerDep) -> GetRewardResponse:
    """OpenRLHF's remote reward model protocol (`--remote_rm_url http://host:port/get_reward`)."""
    results = await worker.score(body.to_inputs(worker.model.encoder.special_tokens))
    return GetRewardResponse.build(results, worker.normalization)


@router.get("/health")
async def health() -> Health:
    """The process is alive (the model may still be loading)."""
    return Health()


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request) -> Any:
    """200 once the model is loaded and warmed up; 503 before, and while shutting down."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    state = Ready(ready=bool(worker and worker.ready), queued_items=worker.queued_items if worker else 0)
    if state.ready:
        return state
    return JSONResponse(state.model_dump(), status_code=503, headers=_retry_after(request))


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
    }
    return Info(**worker.model.info, limits=limits)
