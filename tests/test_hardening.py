"""Hostile input, dead threads, exposed ports: each case failed (a 500, a hang, a leak) before it was fixed."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from app.model import backbones
from app.model.checkpoint import CheckpointError
from app.model.loading import load_reward_model
from tests.conftest import ROOT
from tests.test_robustness import ITEM, gate, gate_tokenizer

JSON = {"content-type": "application/json"}


async def test_a_lone_surrogate_is_422_naming_the_field(make_client: Any) -> None:
    """Valid JSON and a valid str for pydantic, but no tokenizer can read it: it was a 500 from the tokenizer."""
    body = '{"items": [{"prompt": "hi", "response": "ok"}, {"prompt": "\\ud800 there", "response": "ok"}]}'
    async with make_client("llama") as client:
        r = await client.post("/score", content=body, headers=JSON)
        chat = await client.post(
            "/score",
            content='{"items": [{"messages": [{"role": "user", "content": "\\udfff"}, '
            '{"role": "assistant", "content": "x"}]}]}',
            headers=JSON,
        )
    assert r.status_code == 422 and r.json()["error"]["param"] == "items[1].prompt"
    assert "surrogate" in r.json()["error"]["message"]
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "items[0].messages[0].content"


async def test_a_conversation_the_template_refuses_is_422_with_its_message(
    checkpoints: dict[str, Path], tmp_path: Path, make_client: Any
) -> None:
    import httpx
    from asgi_lifespan import LifespanManager

    from app.server.main import create_app
    from tests.conftest import test_settings

    path = shutil.copytree(checkpoints["llama"], tmp_path / "strict")
    config = json.loads((path / "tokenizer_config.json").read_text())
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    config["chat_template"] = strict + "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    system = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    items = [ITEM, {"messages": [*system, {"role": "assistant", "content": "hello"}]}]
    app = create_app(test_settings(path), wait=True)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        refused = await client.post("/score", json={"items": items})
        fine = await client.post("/score", json={"items": [ITEM]})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "items[1]" and "System role not supported" in error["message"]
    assert fine.status_code == 200


@pytest.mark.parametrize("depth", [980, 100_000])
async def test_deeply_nested_free_form_fields_are_not_a_500(make_client: Any, depth: int) -> None:
    """Free-form fields (OpenRLHF labels) are not walked by the limit checks; past what JSON parsing takes, a 422."""
    body = '{"query": ["hello"], "labels": [' + "[" * depth + "]" * depth + "]}"
    async with make_client("llama") as client:
        r = await client.post("/get_reward", content=body, headers=JSON)
    assert r.status_code in (200, 422), r.text
    assert r.status_code == 200 or r.json()["error"]["type"] == "validation_error"


def test_a_max_length_past_the_model_positions_is_refused_at_start(checkpoints: dict[str, Path]) -> None:
    """It used to start, then fail every long item with backend_error."""
    with pytest.raises(CheckpointError, match="max_position_embeddings \\(512\\)"):
        load_reward_model(checkpoints["gpt2"], dtype="float32", device="cpu", max_length=4096)


def test_two_processes_converting_a_backbone_keep_each_others_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second to finish used to delete the first one's published directory, while the first loaded from it."""
    target = tmp_path / "cache" / "backbones" / "fake"

    def convert(source: Path, staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        if not target.exists():  # another process publishes while this one converts
            target.mkdir(parents=True)
            (target / "config.json").write_text("{}")
            (target / "in-use").write_text("a server is reading these")
            (target / "source.json").write_text(json.dumps({"sha256": None}))

    spec = backbones.PackagedBackbone(package="tests", pip="-", file="tiny.py", sha256=None, convert=convert)
    monkeypatch.setitem(backbones.REGISTRY, "fake", spec)
    assert backbones.resolve("fake", tmp_path / "cache") == target
    assert (target / "in-use").exists()  # the first publisher's files stayed
    assert [p.name for p in target.parent.iterdir()] == ["fake"]  # no staging left behind
    (target / "source.json").write_text(json.dumps({"sha256": "stale"}))  # a stale cache is replaced, atomically
    assert backbones.resolve("fake", tmp_path / "cache") == target
    assert not (target / "in-use").exists() and [p.name for p in target.parent.iterdir()] == ["fake"]


async def test_authentication_comes_before_the_body_is_read(make_client: Any) -> None:
    async with make_client("gpt2", api_keys=["k"]) as client:
        garbage = await client.post("/score", content=b"{not json", headers=JSON)
        huge = await client.post("/score", content=b"x" * 20_000_000, headers=JSON)
        keyed = await client.post("/score", content=b"{not json", headers={**JSON, "Authorization": "Bearer k"})
        docs = await client.get("/openapi.json")
    assert garbage.status_code == 401 and garbage.headers["www-authenticate"] == "Bearer"  # it was 422: parsed first
    assert huge.status_code == 401  # not 413: the size of an unknown caller's body is never looked at
    assert keyed.status_code == 422 and docs.status_code == 200


async def test_a_dead_model_thread_fails_every_caller_at_once_and_health_says_so(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        entered, release = gate(worker)
        waiting = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
        await asyncio.to_thread(entered.wait, 30)  # the model thread runs one plan
        queued = asyncio.create_task(client.post("/score", json={"items": [ITEM] * 3}))
        while not worker._handoff.holding:  # the next plan waits for the model thread
            await asyncio.sleep(0.01)

        def poisoned() -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        worker._handoff.take = poisoned  # the next plan is taken outside any plan's own error handling
        release.set()
        first, second = await asyncio.wait_for(asyncio.gather(waiting, queued), 10)  # not their 120 s deadline
        later = await client.post("/score", json={"items": [ITEM]})
        ready, health = await client.get("/ready"), await client.get("/health")
    assert first.status_code == 200
    assert second.status_code == 503 and "model thread died" in second.json()["error"]["message"]
    assert later.status_code == 503 and later.json()["error"]["type"] == "not_ready"
    assert ready.status_code == 503
    assert health.status_code == 503 and "illegal memory access" in health.json()["failure"]
    from app.server.ray_serve import RewardReplica

    replica = SimpleNamespace(app=client.app)  # what Ray calls on the replica every few seconds: it must fail now
    with pytest.raises(RuntimeError, match="illegal memory access"):
        RewardReplica.check_health(replica)  # type: ignore[arg-type]


async def test_admission_counts_live_work_only(make_client: Any) -> None:
    """Timed-out requests' items used to fill the queue until a batch reached them: new requests got 429."""
    async with make_client("gpt2", max_queue_items=8) as client:
        worker = client.app.state.workers[0]
        entered, release = gate(worker)
        try:
            blocker = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
            await asyncio.to_thread(entered.wait, 30)
            timed_out = await asyncio.gather(
                *(client.post("/score", json={"items": [ITEM] * 4}, headers={"X-Request-Timeout": "0.2"}) for _ in "ab")
            )
            assert worker.queued_items == 8  # abandoned, still queued
            admitted = asyncio.create_task(client.post("/score", json={"items": [ITEM] * 4}))
            await asyncio.sleep(0.2)
            release.set()
            results = await asyncio.gather(blocker, admitted)
        finally:
            release.set()
    assert [r.status_code for r in timed_out] == [504, 504]
    assert [r.status_code for r in results] == [200, 200]


def test_compose_never_publishes_the_ray_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    head = compose["services"]["ray-head"]
    assert not any("8265" in str(port) for port in head.get("ports", []))
    assert "--dashboard-host=127.0.0.1" in " ".join(head["command"])


async def test_a_request_still_tokenizing_at_shutdown_is_finished(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM's drain finishes what was admitted; a request between admission and the queue used to get 503."""
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        entered, release = gate_tokenizer(worker, monkeypatch)
        request = asyncio.create_task(client.post("/score", json={"items": [ITEM] * 2}))
        await asyncio.to_thread(entered.wait, 30)
        stopping = asyncio.create_task(worker.stop(30))
        await asyncio.sleep(0.2)
        refused = await client.post("/score", json={"items": [ITEM]})  # new work is refused while draining
        release.set()
        response = await request
        await stopping
    assert response.status_code == 200 and len(response.json()["rewards"]) == 2
    assert refused.status_code == 503


def test_compose_waits_for_the_servers_own_drain_before_killing() -> None:
    """The server bounds its drain (REWARD_GRACEFUL_SHUTDOWN_S); compose's grace period stays above it. It was 930 s,
    which a trickling body could use whole on every deploy."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    drain = float(compose["x-reward-env"]["REWARD_GRACEFUL_SHUTDOWN_S"])
    for name in ("reward-server", "reward-server-gpu", "ray-head"):
        grace = float(compose["services"][name]["stop_grace_period"].removesuffix("s"))
        assert drain < grace <= 300, name


def test_deploy_files_expose_nothing_by_default() -> None:
    """Compose published on every interface with no key; KubeRay exposed Ray's ports to any pod; its build line
    passed a build argument the Dockerfile does not take, and the base image moved with its tag."""
    import re

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-reward-env"]["REWARD_API_KEYS"] == "${REWARD_API_KEYS:-}"
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${REWARD_PUBLISH_ADDRESS:-127.0.0.1}:"), (name, port)
        if "ports" in service or name != "ray-worker":
            assert service.get("restart") == "unless-stopped", name  # the process exits when its model thread dies
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    arguments = set(re.findall(r"^ARG (\w+)=", dockerfile, re.M))
    kuberay = (ROOT / "deploy/kuberay/rayservice.yaml").read_text()
    for line in (line for line in kuberay.splitlines() if "docker build" in line):
        for name, value in re.findall(r"--build-arg (\w+)=(\S+)", line):
            assert name in arguments, line
            if name == "LOCK":
                assert re.search(r"^ray==", (ROOT / value).read_text(), re.M), value
    service = yaml.safe_load(kuberay)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    workers = [g["template"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    policy = yaml.safe_load((ROOT / "deploy/kuberay/networkpolicy.yaml").read_text())
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for template in (head, *workers):
        assert selected.items() <= template["metadata"]["labels"].items()
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == [8000]  # serve only
    dashboard = [rule for rule in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in rule.get("ports", []))]
    assert dashboard and all("namespaceSelector" in peer for rule in dashboard for peer in rule["from"])


async def test_a_deadline_past_the_bound_gets_the_bound(make_client: Any) -> None:
    """A client whose own timeout is longer than the server allows is served within the bound, not refused."""
    async with make_client("gpt2", max_request_timeout_s=30) as client:
        long = await client.post("/score", json={"items": [ITEM]}, headers={"X-Request-Timeout": "5000"})
        bad = await client.post("/score", json={"items": [ITEM]}, headers={"X-Request-Timeout": "soon"})
    assert long.status_code == 200
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "X-Request-Timeout"
