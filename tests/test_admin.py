"""The admin API: a hot swap under continuous load answers every request, each wholly by one model (its fingerprint
matches its rewards); an unload waits for what was admitted, then frees the model; admin routes need an admin key."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

import app.server.admin
from app.server.main import create_app
from tests.conftest import test_settings

ITEMS = [{"prompt": "Say hi", "response": f"Hello number {i}, how can I help?"} for i in range(6)]
ADMIN = {"Authorization": "Bearer boss"}


@asynccontextmanager
async def serving(tmp_path: Path, checkpoints: dict[str, Path], **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    models = tmp_path / "models.toml"
    models.write_text(f'default = "prod"\n[models.a]\npath = "{checkpoints["llama"]}"\n[aliases]\nprod = "a"\n')
    settings = test_settings(checkpoints["llama"], models_file=models, **overrides)
    served = create_app(settings, wait=True)
    async with (
        LifespanManager(served) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        client.app = served  # type: ignore[attr-defined]
        yield client


async def test_admin_routes_need_the_admin_key(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    body = {"name": "b", "path": str(checkpoints["gpt2"])}
    async with serving(tmp_path, checkpoints) as client:
        off = await client.post("/admin/models", json=body)
    async with serving(tmp_path, checkpoints, admin_keys="boss", api_keys="user") as client:
        anonymous = await client.post("/admin/models", json=body)
        user = await client.post("/admin/models", json=body, headers={"Authorization": "Bearer user"})
        alias = await client.put("/admin/aliases/prod", json={"model": "a"}, headers={"Authorization": "Bearer user"})
        admin_on_scoring = await client.post("/score", json={"items": ITEMS}, headers=ADMIN)
        allowed = await client.put("/admin/aliases/prod", json={"model": "a"}, headers=ADMIN)
    assert off.status_code == 403 and off.json()["error"]["type"] == "forbidden"
    assert {anonymous.status_code, user.status_code, alias.status_code, admin_on_scoring.status_code} == {401}
    assert "admin key" in user.json()["error"]["message"]
    assert allowed.status_code == 200 and allowed.json()["kind"] == "alias"


async def test_a_hot_swap_under_load_answers_every_request_from_one_model(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    async with serving(tmp_path, checkpoints, admin_keys="boss") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        before = (await client.post("/score", json={"items": ITEMS})).json()
        old_model = weakref.ref(registry.models["a"].worker.model)
        answers: list[httpx.Response] = []
        stop = asyncio.Event()

        async def trainer() -> None:
            while not stop.is_set():
                answers.append(await client.post("/score", json={"items": ITEMS, "model": "prod"}))

        load = asyncio.gather(*(trainer() for _ in range(4)))
        await asyncio.sleep(0.3)
        loaded = await client.post("/admin/models", json={"name": "b", "path": str(checkpoints["gpt2"])}, headers=ADMIN)
        stage = (await client.get("/ready")).json()["stage"]  # an admin load is not start-up: its stage stays
        await asyncio.sleep(0.3)
        swapped = await client.put("/admin/aliases/prod", json={"model": "b"}, headers=ADMIN)
        in_use = await client.delete("/admin/models/b", headers=ADMIN)  # the alias points at it
        await asyncio.sleep(0.3)
        unloaded = await client.delete("/admin/models/a", headers=ADMIN)
        await asyncio.sleep(0.3)
        stop.set()
        await load
        after = (await client.post("/score", json={"items": ITEMS, "model": "b"})).json()
        gone = await client.post("/score", json={"items": ITEMS, "model": "a"})
        listed = {card["id"] for card in (await client.get("/v1/models")).json()["data"]}
    assert loaded.status_code == 201 and loaded.json()["state"] == "ready"
    assert stage.startswith("ready: a (fingerprint")
    assert swapped.status_code == 200 and swapped.json()["root"] == "b"
    assert in_use.status_code == 409 and "alias prod" in in_use.json()["error"]["message"]
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] == "a"
    assert gone.status_code == 404 and listed == {"b", "prod"}
    assert [r.status_code for r in answers] == [200] * len(answers) and len(answers) > 8
    expected = {before["fingerprint"]: before["rewards"], after["fingerprint"]: after["rewards"]}
    seen = set()
    for answer in answers:
        body = answer.json()
        assert body["rewards"] == expected[body["fingerprint"]]  # wholly one model's rewards, named by it
        seen.add(body["fingerprint"])
    assert seen == set(expected)  # traffic reached both sides of the swap
    gc.collect()
    assert old_model() is None  # the unloaded model is freed


async def test_loading_is_refused_when_it_cannot_fit_or_read(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, checkpoints, admin_keys="boss") as client:
        taken = await client.post("/admin/models", json={"name": "a", "path": str(checkpoints["gpt2"])}, headers=ADMIN)
        missing = await client.post("/admin/models", json={"name": "c", "path": str(tmp_path / "no")}, headers=ADMIN)
        knob = await client.post(
            "/admin/models", json={"name": "c", "path": str(checkpoints["gpt2"]), "colour": 1}, headers=ADMIN
        )
        monkeypatch.setattr(app.server.admin, "free_bytes", lambda device: 1024)
        full = await client.post("/admin/models", json={"name": "c", "path": str(checkpoints["gpt2"])}, headers=ADMIN)
        default = await client.delete("/admin/models/a", headers=ADMIN)
        listed = {card["id"] for card in (await client.get("/v1/models")).json()["data"]}
    assert taken.status_code == 409 and missing.status_code == 422 and missing.json()["error"]["param"] == "path"
    assert knob.status_code == 422 and "colour" in knob.json()["error"]["message"]
    assert full.status_code == 507 and full.json()["error"]["type"] == "insufficient_memory"
    assert "GiB" in full.json()["error"]["message"]
    assert default.status_code == 409 and listed == {"a", "prod"}


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def test_unloading_gives_the_memory_back_and_aliases_come_and_go(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    """A model of ~125 MB of weights: unloading it gives back its weights' size of RSS, to within 10%, whatever
    earlier tests left in this process."""
    import torch
    from transformers import LlamaForSequenceClassification

    from tests import tiny

    tokenizer = tiny.byte_level_tokenizer(bos=True, chat=True)
    torch.manual_seed(0)
    config = tiny.llama_config(tokenizer, num_labels=1)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim = 512, 2048, 8, 128
    big = tmp_path / "big"
    LlamaForSequenceClassification(config).save_pretrained(big)
    tokenizer.save_pretrained(big)
    async with serving(tmp_path, checkpoints, admin_keys="boss") as client:
        gc.collect()
        before = rss()
        body = {"name": "big", "path": str(big), "batch_invariant": False}  # memory is measured, not kernels
        loaded = await client.post("/admin/models", json=body, headers=ADMIN)
        assert (await client.post("/score", json={"items": ITEMS, "model": "big"})).status_code == 200
        during = rss()
        pointed = await client.put("/admin/aliases/spare", json={"model": "big"}, headers=ADMIN)
        held = await client.delete("/admin/models/big", headers=ADMIN)  # the alias still names it
        dropped = await client.delete("/admin/aliases/spare", headers=ADMIN)
        default = await client.delete("/admin/aliases/prod", headers=ADMIN)
        unloaded = await client.delete("/admin/models/big", headers=ADMIN)
        after = rss()
    assert loaded.status_code == 201 and pointed.status_code == 200 and held.status_code == 409
    assert dropped.json() == {"removed": "spare"} and default.status_code == 409 and unloaded.status_code == 200
    weights = app.server.admin.weights_bytes(big)  # ~125 MB of float32
    assert during - after > 0.9 * weights and after - before < 0.1 * weights, (before, during, after, weights)
