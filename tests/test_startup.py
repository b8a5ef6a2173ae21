"""Start-up that talks: the port answers while the model loads, a failure is one line naming the problem, a second
start reads its kernel measurements instead of measuring again, and the API pages work offline."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

import app.server.startup
from app.model import invariant
from app.server.main import create_app
from tests.conftest import test_settings

ITEM = {"prompt": "What is 2+2?", "response": "4"}


async def _until(condition: Any, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_the_port_answers_while_the_model_loads(
    checkpoints: dict[str, Path], load: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    model = load("gpt2")

    def slow_load(settings: Any) -> Any:
        release.wait(60)
        return model

    monkeypatch.setattr(app.server.startup, "load_model", slow_load)
    served = create_app(test_settings(checkpoints["gpt2"]))
    async with (
        LifespanManager(served) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        health, ready, score = await asyncio.gather(
            client.get("/health"), client.get("/ready"), client.post("/score", json={"items": [ITEM]})
        )
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "1"
        body = ready.json()
        assert body["status"] == "starting" and body["stage"] == f"loading {checkpoints['gpt2']}" and not body["ready"]
        assert score.status_code == 503 and score.json()["error"]["type"] == "not_ready"
        release.set()
        await served.state.startup.finished()
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert "fingerprint" in ready.json()["stage"]
        await asyncio.sleep(0.2)  # once ready, elapsed_s is how long start-up took: its clock has stopped
        assert (await client.get("/ready")).json()["elapsed_s"] == ready.json()["elapsed_s"] >= body["elapsed_s"]
        assert (await client.post("/score", json={"items": [ITEM]})).status_code == 200


async def test_a_failed_start_is_one_line_naming_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    ended = threading.Event()
    served = create_app(test_settings(broken), on_model_death=ended.set)
    caplog.set_level(logging.INFO, logger="app.server.startup")
    async with (
        LifespanManager(served) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        await _until(ended.is_set)
        ready, health = await client.get("/ready"), await client.get("/health")
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert f"{broken}/config.json: invalid JSON" in ready.json()["stage"]
    assert health.status_code == 503 and "invalid JSON" in health.json()["failure"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None  # the traceback only at debug level
    assert f"{broken}/config.json: invalid JSON" in errors[0].getMessage()
    from app.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="invalid JSON"):  # the typed error itself, for Ray and tests
        await served.state.startup.finished()


def test_a_second_start_reads_the_kernel_measurements(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.model.loading import load_reward_model

    model = load_reward_model(checkpoints["llama"], dtype="float32", device="cpu")
    first = model.prepare(measured=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and first.batch_invariant

    def no_sweep(*args: Any) -> Any:
        raise AssertionError("measured again")

    monkeypatch.setattr(invariant, "sweep", no_sweep)
    monkeypatch.setattr(invariant, "rows_stay_put", no_sweep)
    assert model.prepare(measured=tmp_path) == first  # read, not measured: the same kernels and evidence
    files[0].write_text("{not json")  # a damaged file is measured again, not trusted
    monkeypatch.undo()
    assert model.prepare(measured=tmp_path) == first
    assert files[0].read_text().startswith("{\n")
    with pytest.raises(AssertionError, match="measured again"):  # other threads: other measurements
        monkeypatch.setattr(invariant, "sweep", no_sweep)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            model.prepare(measured=tmp_path)
        finally:
            torch.set_num_threads(threads)


async def test_the_api_pages_work_offline_and_list_every_route(make_client: Any) -> None:
    async with make_client("gpt2", api_keys=["k"]) as client:
        page = await client.get("/docs")
        assets = [a for a in ("swagger-ui-bundle.js", "swagger-ui.css") if f"/docs/assets/{a}" in page.text]
        fetched = [await client.get(f"/docs/assets/{a}") for a in assets]
        schema = (await client.get("/openapi.json")).json()
        sneaking = await client.post("/docs/assets/../score", json={"items": [ITEM]})
        locked = await client.post("/score", json={"items": [ITEM]})
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assert len(assets) == 2 and all(r.status_code == 200 and len(r.content) > 10_000 for r in fetched)
    from app.server.admin import admin_router
    from app.server.routes import open_router, router

    routes = {r.path for r in [*router.routes, *open_router.routes, *admin_router.routes]}  # type: ignore[attr-defined]
    assert {"/v1/classify", "/metrics", "/pooling", "/get_reward", "/admin/models"} <= routes
    assert routes == set(schema["paths"])
    assert sneaking.status_code in (401, 404) and locked.status_code == 401


@pytest.mark.slow
def test_the_startup_benchmark_times_three_starts(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from app.bench.startup import STARTS, report
    from tests.conftest import free_port

    table = report(checkpoints["llama"], tmp_path / "cache", free_port())
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "s |" not in line]
    assert [row[0].strip() for row in rows] == list(STARTS)
    for _, port, ready, reward in rows:
        assert 0 < float(port) <= float(ready) <= float(reward)
    assert list((tmp_path / "cache" / "kernels").glob("*.json"))  # what the later starts read
