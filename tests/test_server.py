"""A real server process: uvicorn over TCP on 127.0.0.1, the console script, the compose file's command."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port, start_server, wait_ready

pytestmark = pytest.mark.slow  # every test starts a server process

ITEM = {"prompt": "What is the capital of France?", "response": "Paris."}


def test_live_server_scores_over_tcp(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
        info = client.get("/info").json()
        r = client.post("/score", json={"items": [ITEM, {"prompt": "hi", "response": "hello"}]})
        bad = client.post("/score", json={"items": [{"prompt": "x", "response": 1}]})
    assert r.status_code == 200 and r.json()["fingerprint"] == info["fingerprint"]
    assert len(r.json()["rewards"]) == 2
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "items[0].response"


async def test_live_server_many_concurrent_clients(live_server: str) -> None:
    async with httpx.AsyncClient(base_url=live_server, timeout=60) as client:
        singles = await asyncio.gather(
            *(
                client.post(
                    "/score", json={"items": [{"prompt": f"question {i}", "response": "answer " * (i % 9 + 1)}]}
                )
                for i in range(64)
            )
        )
        batch = await client.post(
            "/score",
            json={"items": [{"prompt": f"question {i}", "response": "answer " * (i % 9 + 1)} for i in range(64)]},
        )
    assert all(r.status_code == 200 for r in singles)
    alone = [r.json()["rewards"][0] for r in singles]
    assert batch.json()["rewards"] == pytest.approx(alone, abs=1e-5)  # same reward whatever the batching


def test_bad_checkpoint_exits_non_zero_fast_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model", str(broken), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert f"{broken}/config.json: invalid JSON" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60


def test_compose_service_command_and_healthcheck(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """No Docker engine here: run exactly the command and environment docker-compose.yml declares, with the
    `./models` volume at its host path and the published port moved to a free one on 127.0.0.1."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["reward-server"]
    host_models, container_models = service["volumes"][0].split(":")[:2]
    assert host_models == "./models"
    models = tmp_path / "models"
    shutil.copytree(checkpoints["llama"], models / "default")

    def interpolated(value: object) -> str:  # compose's `${VAR:-default}`, with none of them set
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))

    env = {k: interpolated(v).replace(container_models, str(models)) for k, v in service["environment"].items()}
    port = free_port()
    env.update(REWARD_HOST="127.0.0.1", REWARD_PORT=str(port))
    command = service["command"]
    assert command[0] == "reward-server"
    executable = shutil.which("reward-server") or str(Path(sys.executable).parent / "reward-server")
    proc = start_server([executable, *command[1:]], env, port, tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        r = httpx.post(f"{url}/score", json={"items": [ITEM]}, timeout=30)
        assert r.status_code == 200 and isinstance(r.json()["rewards"][0], float)
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD"
        health = subprocess.run([sys.executable, *check[2:]], env={**env, "PATH": ""}, timeout=30)
        assert health.returncode == 0
    finally:
        proc.terminate()
        proc.wait(30)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER app" in dockerfile and "/ready" in dockerfile and 'VOLUME ["/models"]' in dockerfile


async def test_live_server_trainer_endpoints(live_server: str) -> None:
    """OpenRLHF's one-request-per-sample pattern and a GRPO group over real TCP."""
    prompt = "What is the capital of France?"
    replies = ["Paris.", "Madrid.", "It is Paris, of course."]
    async with httpx.AsyncClient(base_url=live_server, timeout=60) as client:
        singles = await asyncio.gather(
            *(
                client.post("/get_reward", json={"query": [prompt + " " + r], "prompts": [prompt], "labels": [""]})
                for r in replies
            )
        )
        rank = await client.post(
            "/rank", json={"groups": [{"prompt": prompt, "responses": [" " + r for r in replies]}]}
        )
        score = await client.post("/score", json={"items": [{"prompt": prompt, "response": " " + r} for r in replies]})
    want = score.json()["rewards"]
    assert [r.json()["rewards"][0] for r in singles] == pytest.approx(want, abs=1e-5)
    group = rank.json()["groups"][0]
    assert group["rewards"] == pytest.approx(want, abs=1e-5)
    assert sorted(group["ranks"]) == [1, 2, 3]
