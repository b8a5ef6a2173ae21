"""Shared fixtures: tiny checkpoints (built once per session), loaded models, in-process and live-server clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.model.loading import load_reward_model
from app.model.recipe import Item
from app.model.reward_model import RewardModel
from app.server.main import create_app
from app.settings import Settings
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]

# Fixtures that start a live server process (uvicorn, `reward-server serve`, a Ray cluster): a test using one is in the
# slow lane (`pytest -m slow`); `pytest -m "not slow"` runs everything that runs in this process.
LIVE_FIXTURES = {"live_server", "server", "ray_url"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LIVE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {
        "llama": tiny.build_llama_seq_cls(root / "llama"),
        "gpt2": tiny.build_gpt2_seq_cls(root / "gpt2"),
        "bert": tiny.build_bert_seq_cls(root / "bert"),
        "value_head": tiny.build_value_head(root / "value_head"),
        "openrlhf": tiny.build_openrlhf(root / "openrlhf"),
        "llama_3labels": tiny.build_llama_seq_cls(root / "llama_3labels", num_labels=3),
    }
    paths["peft"] = tiny.build_peft(root / "peft", paths["llama"])
    return paths


@pytest.fixture(scope="session")
def load(checkpoints: dict[str, Path]) -> Callable[..., RewardModel]:
    """Load a tiny checkpoint in float32 on the CPU, cached per (name, options)."""
    cache: dict[tuple[str, tuple[tuple[str, object], ...]], RewardModel] = {}

    def _load(name: str, **options: object) -> RewardModel:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = load_reward_model(checkpoints[name], dtype="float32", device="cpu", **options)  # type: ignore[arg-type]
        return cache[key]

    return _load


def direct(model: RewardModel, inputs: Sequence[Item]) -> list[float]:
    """The reference every numeric test compares with: each item alone, one plain padded forward through the
    backbone's stock forward (no plan, no packing, no prompt laid out apart)."""
    return [model.stock([e])[0] for e in model.encoder.encode_batch(list(inputs))]


def test_settings(model_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"model_path": model_path, "dtype": "float32", "device": "cpu"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
def make_client(
    checkpoints: dict[str, Path], load: Callable[..., RewardModel]
) -> Callable[..., AsyncIterator[httpx.AsyncClient]]:
    """`async with make_client("llama", max_queue_items=4) as client:` an in-process app with its lifespan run."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def _client(name: str = "llama", **overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        settings = test_settings(checkpoints[name], **overrides)
        app = create_app(settings, model=load(name), wait=True)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                client.app = app  # type: ignore[attr-defined]  # tests look at the worker's stats
                yield client

    return _client  # type: ignore[return-value]


@asynccontextmanager
async def serving(path: Path, **settings: object) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app serving checkpoint `path` with these settings, loaded by its own start-up (as `serve` does)."""
    app = create_app(test_settings(path, **settings), wait=True)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        yield app, client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start_server(args: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(args, env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def live_server(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `uvicorn app.server.main:app` process on 127.0.0.1, configured through REWARD_* variables."""
    port = free_port()
    log = tmp_path_factory.mktemp("live") / "server.log"
    env = {"REWARD_MODEL_PATH": str(checkpoints["llama"]), "REWARD_DTYPE": "float32", "REWARD_DEVICE": "cpu"}
    command = [sys.executable, "-m", "uvicorn", "app.server.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_server(command, env, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    except Exception:
        print(log.read_text())
        raise
    finally:
        proc.terminate()
        proc.wait(30)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(checkpoints: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., tuple[str, object]]]:
    procs = []

    def _start(name: str = "gpt2", **env: str) -> tuple[str, object]:
        port = free_port()
        settings = {
            "REWARD_MODEL_PATH": str(checkpoints[name]),
            "REWARD_DTYPE": "float32",
            "REWARD_DEVICE": "cpu",
            "REWARD_PORT": str(port),
            "REWARD_LOG_LEVEL": "warning",
            **env,
        }
        proc = start_server([sys.executable, "-m", "app.cli", "serve"], settings, port, tmp_path / f"{port}.log")
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        return url, proc

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
