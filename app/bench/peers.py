"""The peers `reward-server bench` compares against, written as their users write them, on our model and recipe.

No `from __future__ import annotations`: LitServe builds its request model from the live annotations.

Run as `python -m app.bench.peers {naive,litserve} MODEL DTYPE PORT` (the benchmark starts them); not part of the
service.
"""

import sys
from pathlib import Path
from typing import Any

from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput


def _inputs(body: dict[str, Any]) -> list[ScoringInput]:
    return [ScoringInput(x["prompt"], x["response"]) for x in body["items"]]


def serve_naive(model_path: str, dtype: str, port: int) -> None:
    """OpenRLHF `serve_rm.py`: the forward runs inside the request handler, padded to the request's longest item."""
    import uvicorn
    from fastapi import FastAPI

    model = load_reward_model(Path(model_path), dtype=dtype)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/score")
    async def score(body: dict[str, Any]) -> dict[str, list[float]]:  # blocks the loop, as serve_rm.py does
        return {"rewards": model.stock(model.encoder.encode_batch(_inputs(body)))}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


try:
    import litserve as ls
except ImportError:  # the `bench` extra
    ls = None

if ls is not None:

    class LitRewardAPI(ls.LitAPI):  # type: ignore[misc]
        """LitServe's dynamic batching gathers requests; one padded forward per gathered batch."""

        def __init__(self, model_path: str, dtype: str) -> None:
            super().__init__(max_batch_size=16, batch_timeout=0.01)
            self.model_path, self.dtype = model_path, dtype

        def setup(self, device: str) -> None:
            self.model = load_reward_model(Path(self.model_path), dtype=self.dtype)

        def decode_request(self, request: dict[str, Any]) -> list[ScoringInput]:
            return _inputs(request)

        def predict(self, batch: list[list[ScoringInput]]) -> list[list[float]]:
            flat = [x for request in batch for x in request]
            rewards = iter(self.model.stock(self.model.encoder.encode_batch(flat)))
            return [[next(rewards) for _ in request] for request in batch]

        def encode_response(self, output: list[float]) -> dict[str, list[float]]:
            return {"rewards": output}


def serve_litserve(model_path: str, dtype: str, port: int) -> None:
    if ls is None:
        raise SystemExit("litserve is not installed: pip install -e '.[bench]'")
    server = ls.LitServer(LitRewardAPI(model_path, dtype), accelerator="auto")
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    mode, model_path, dtype, port = sys.argv[1:5]
    {"naive": serve_naive, "litserve": serve_litserve}[mode](model_path, dtype, int(port))
