"""Ray Serve: `reward-server serve --ray` on a local Ray cluster (127.0.0.1) with 2 replicas serves the same API,
errors and rewards as the single-process server, spreads requests over both replicas, and loses no request when a
replica is killed under load (the client's retries included)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.clients.client import AsyncRewardClient
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel
from tests import tiny
from tests.conftest import free_port, serving, start_server, wait_ready

ray = pytest.importorskip("ray")

REPLICA_PREFIX = "SERVE_REPLICA::reward-server#"
# Ray Serve kills a proxy that has not answered its readiness check in 5 s three times running: on a busy machine the
# proxy is still importing by then, and `serve.start` fails. Its clusters here get the room a slow machine needs.
PATIENT = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@pytest.mark.slow  # a Ray cluster of its own
def test_a_broken_checkpoint_fails_the_deployment_at_once_naming_the_file(tmp_path: Path) -> None:
    """Its own local cluster (no REWARD_RAY_ADDRESS); runs before the module's cluster starts."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    env = {**PATIENT, "REWARD_MODEL_PATH": str(broken), "REWARD_PORT": str(free_port()), "REWARD_LOG_FORMAT": "text"}
    proc = start_server([sys.executable, "-m", "app.cli", "serve", "--ray"], env, 0, tmp_path / "serve.log")
    assert proc.wait(180) == 1
    last = (tmp_path / "serve.log").read_text().strip().splitlines()[-1]
    assert last.startswith("reward-server serve --ray:") and f"CheckpointError: {broken}/config.json" in last


@pytest.mark.slow  # a Ray cluster of its own
def test_each_replica_serves_the_whole_models_file(tmp_path: Path) -> None:
    """One deployment for the registry: a replica answers any model or ensemble by name, a shared base's members on
    one worker, with the rewards and fingerprints of the single-process server; the admin API is refused there."""
    members = tiny.build_members(tmp_path / "members", 2)
    spec = tmp_path / "models.toml"
    spec.write_text(
        "".join(f'[models.m{k}]\npath = "{p}"\n' for k, p in enumerate(members))
        + '[ensembles.both]\nmembers = ["m0", "m1"]\naggregate = "min"\n'
    )
    port = free_port()
    env = {
        **PATIENT,
        "REWARD_MODELS_FILE": str(spec),
        "REWARD_DTYPE": "float32",
        "REWARD_DEVICE": "cpu",
        "REWARD_PORT": str(port),
        "REWARD_RAY_REPLICAS": "1",
        "REWARD_RAY_NUM_CPUS": "1",
        "REWARD_ADMIN_KEYS": "admin",
    }
    proc = start_server([sys.executable, "-m", "app.cli", "serve", "--ray"], env, port, tmp_path / "serve.log")
    url, items = (
        f"http://127.0.0.1:{port}",
        [{"prompt": "Hi", "response": "Hello!"}, {"prompt": "2+2?", "response": "4"}],
    )
    try:
        wait_ready(url, proc, timeout=180)
        remote = {n: httpx.post(f"{url}/score", json={"items": items, "model": n}, timeout=60).json() for n in MODELS}
        admin = httpx.post(
            f"{url}/admin/models",
            json={"name": "x", "path": str(members[0])},
            timeout=60,
            headers={"Authorization": "Bearer admin"},
        )
    finally:  # the CLI stops the cluster it started (its exit status on the way is Ray's, not what this tests)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    local = asyncio.run(_score_locally(members[0], spec, items))
    for name in MODELS:
        assert (remote[name]["rewards"], remote[name]["fingerprint"]) == (
            local[name]["rewards"],
            local[name]["fingerprint"],
        )
    assert [i["members"] for i in remote["both"]["items"]] == [
        {"m0": a, "m1": b} for a, b in zip(remote["m0"]["rewards"], remote["m1"]["rewards"], strict=True)
    ]
    assert admin.status_code == 409 and "redeploying" in admin.json()["error"]["message"]


MODELS = ("m0", "m1", "both")


async def _score_locally(path: Path, spec: Path, items: list[dict[str, str]]) -> dict[str, dict[str, object]]:
    threads = torch.get_num_threads()  # the replica runs one thread: so does this server, or fingerprints differ
    try:
        async with serving(path, models_file=spec, num_threads=1) as (app, client):
            assert len(app.state.registry.workers) == 1  # the members share one base pass
            return {n: (await client.post("/score", json={"items": items, "model": n})).json() for n in MODELS}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_url(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster (this process is a driver, to find and kill replicas) and the CLI deploying onto it."""
    with pytest.MonkeyPatch.context() as env_of_the_cluster:
        for name, value in PATIENT.items():
            env_of_the_cluster.setenv(name, value)
        context = ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    env = {
        "REWARD_MODEL_PATH": str(checkpoints["llama"]),
        "REWARD_DTYPE": "float32",
        "REWARD_DEVICE": "cpu",
        "REWARD_PORT": str(port),
        "REWARD_LOG_FORMAT": "text",
        "REWARD_RAY_ADDRESS": context.address_info["address"],
        "REWARD_RAY_REPLICAS": "2",
        "REWARD_RAY_NUM_CPUS": "1",
    }
    proc = start_server([sys.executable, "-m", "app.cli", "serve", "--ray"], env, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0  # drained, deployment deleted, exit 0
    except BaseException:
        print(log.read_text())
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()


def replicas() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in names if a["name"].startswith(REPLICA_PREFIX)]


BODIES: list[tuple[str, dict[str, object]]] = [
    ("/score", {"items": [{"prompt": "Hi", "response": "Hello!"}, {"prompt": "2+2?", "response": "4"}]}),
    ("/score", {"items": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]}),
    ("/compare", {"pairs": [{"prompt": "Capital of France?", "a": "Paris.", "b": "Lyon."}]}),
    ("/score", {"items": [{"prompt": "Hi"}]}),  # 422: where and what
    ("/score", {"items": []}),
]


async def test_same_answers_as_the_single_process_server(
    ray_url: str, make_client: Callable[..., AsyncIterator[httpx.AsyncClient]]
) -> None:
    # the replica runs one thread (its CPU share); so does the local server here, or the fingerprints rightly differ:
    # a kernel's reduction order follows its thread split
    threads = torch.get_num_threads()
    try:
        async with (
            make_client("llama", num_threads=1) as local,
            httpx.AsyncClient(base_url=ray_url, timeout=60) as remote,
        ):
            for path, body in BODIES:
                expected, got = await local.post(path, json=body), await remote.post(path, json=body)
                assert (got.status_code, got.json()) == (expected.status_code, expected.json()), path
            for path in ("/info", "/ready", "/health"):
                got, expected = (await remote.get(path)).json(), (await local.get(path)).json()
                if path == "/ready":  # each process's own start-up time
                    assert got.pop("elapsed_s") >= 0 and expected.pop("elapsed_s") >= 0
                assert got == expected, path
    finally:
        torch.set_num_threads(threads)


async def test_requests_spread_over_both_replicas(ray_url: str) -> None:
    """Concurrent requests land on both replicas. Ray's router picks by queue length and the proxy learns of the
    replicas asynchronously after a deploy, so it gets a few bursts to show it."""
    seen: set[str] = set()
    body = {"items": [{"prompt": f"Hi {i}", "response": "Hello! " * 40} for i in range(8)]}
    async with httpx.AsyncClient(base_url=ray_url, timeout=60) as client:
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            responses = await asyncio.gather(*(client.post("/score", json=body) for _ in range(32)))
            assert all(r.status_code == 200 for r in responses)
            seen |= {r.headers["x-replica"] for r in responses}
    assert len(seen) == 2 and len(replicas()) == 2


async def test_a_replica_killed_under_load_loses_no_request(ray_url: str, load: Callable[..., RewardModel]) -> None:
    """Requests heavy enough that the killed replica holds several when it dies: Ray's proxy answers those with an
    untyped 500, which the client resends to the surviving replica."""
    model = load("llama")
    long = [f"Answer {j}: " + "and so on " * (20 + j) for j in range(16)]
    requests = [[(f"Question {i}.{j}?", long[j]) for j in range(16)] for i in range(96)]
    expected = [model.score(model.encoder.encode_batch([ScoringInput(*x) for x in r])) for r in requests]
    done = 0

    async with AsyncRewardClient(ray_url, max_retries=20, backoff_base=0.05, backoff_max=1.0) as client:
        semaphore = asyncio.Semaphore(32)

        async def one(items: list[tuple[str, str]]) -> list[float]:
            nonlocal done
            async with semaphore:
                result = await client.score(items)
                done += 1
                return result.rewards

        tasks = [asyncio.create_task(one(r)) for r in requests]
        while done < 16:
            await asyncio.sleep(0.01)
        victim = replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
        killed_at = done
        rewards = await asyncio.gather(*tasks)

    assert killed_at < len(requests) - 32  # the kill happened under load
    for got, want in zip(rewards, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    deadline = time.monotonic() + 120  # and Ray brings the replica count back
    while time.monotonic() < deadline and len(replicas()) < 2:
        await asyncio.sleep(0.5)
    assert len(replicas()) == 2 and victim not in replicas()


def test_deploy_examples_name_real_settings() -> None:
    """The KubeRay RayService and the compose file configure the service through Settings fields that exist."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from app.settings import Settings

    root = Path(__file__).resolve().parents[1]
    service = yaml.safe_load((root / "deploy/kuberay/rayservice.yaml").read_text())
    config = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    for application in config.applications:
        module, name = application.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), name))
        Settings(**application.args)  # extra="ignore" would hide a typo: check the names too
        assert set(application.args) <= set(Settings.model_fields)
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    names = {k for service in compose["services"].values() for k in service.get("environment", {})}
    fields = {f"REWARD_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in names if n.startswith("REWARD_")} <= fields


def _counters(url: str, replicas: int = 2) -> dict[str, tuple[float, float]]:
    """Per replica: (items scored, items dropped), read from /metrics until every replica answered once."""
    seen: dict[str, tuple[float, float]] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(60):
            response = client.get("/metrics")
            lines = dict(
                line.rsplit(" ", 1) for line in response.text.splitlines() if line and not line.startswith("#")
            )
            seen[response.headers["x-replica"]] = (
                float(lines.get("reward_items_scored_total", 0)),
                float(lines.get("reward_items_dropped_total", 0)),
            )
            if len(seen) == replicas:
                break
    return seen


def test_a_client_leaving_through_the_proxy_drops_its_items(ray_url: str) -> None:
    """Ray's proxy cancels the handler when its client disconnects: the request's queued items are dropped, not
    computed (a cancelled handler used to leave them queued: 560 of 600 were computed)."""
    before = _counters(ray_url)
    body = {"items": [{"prompt": f"question {i} " * 20, "response": "an answer " * 40} for i in range(800)]}
    with httpx.Client(base_url=ray_url, timeout=0.8) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/score", json=body)  # gives up, closing the connection
    time.sleep(8)  # what the replica had admitted is dropped or finished by now
    after = _counters(ray_url)
    scored = sum(after[r][0] - before.get(r, (0, 0))[0] for r in after)
    dropped = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    assert dropped > 0 and scored < 800, (scored, dropped)
