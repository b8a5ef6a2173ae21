"""Several models behind one server (REWARD_MODELS_FILE): each answers by name exactly as it does served alone, an
ensemble's reward is its aggregate's formula over those rewards, and every response names the model that scored it."""

from __future__ import annotations

import math
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.server.main import create_app
from app.server.models_file import ModelsFile
from tests.conftest import test_settings

ITEMS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Name a colour.", "response": "Blue, like the sky on a clear summer day."},
    {"prompt": "Say hi", "response": "Hello there! How can I help you today?"},
]


def models_file(tmp_path: Path, checkpoints: dict[str, Path]) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(
        f"""
default = "a"

[models.a]
path = "{checkpoints["llama"]}"

[models.b]
path = "{checkpoints["gpt2"]}"
normalize = true
reward_mean = 0.25
reward_std = 2.0

[ensembles.mean]
members = ["a", "b"]

[ensembles.min]
members = ["a", "b"]
aggregate = "min"

[ensembles.uwo]
members = ["a", "b"]
aggregate = "uwo"
lambda = 0.5

[ensembles.softmin]
members = ["a", "b"]
aggregate = "softmin"
beta = 0.5

[aliases]
production = "b"
"""
    )
    return path


@asynccontextmanager
async def serving(settings_path: Path, checkpoints: dict[str, Path]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(test_settings(checkpoints["llama"], models_file=settings_path), wait=True)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        yield client


FORMULAS: dict[str, Any] = {  # written out here, apart from app.model.ensemble
    "mean": lambda r: sum(r) / len(r),
    "min": min,
    "uwo": lambda r: statistics.fmean(r) - 0.5 * statistics.pvariance(r),
    "softmin": lambda r: -0.5 * math.log(sum(math.exp(-x / 0.5) for x in r) / len(r)),
}


async def test_each_model_by_name_and_ensembles_by_their_formulas(
    tmp_path: Path, checkpoints: dict[str, Path], make_client: Any
) -> None:
    async with serving(models_file(tmp_path, checkpoints), checkpoints) as client:
        alone = {name: (await client.post("/score", json={"items": ITEMS, "model": name})).json() for name in "ab"}
        default = (await client.post("/score", json={"items": ITEMS})).json()
        aliased = (await client.post("/score", json={"items": ITEMS, "model": "production"})).json()
        ensembles = {
            name: (await client.post("/score", json={"items": ITEMS, "model": name})).json() for name in FORMULAS
        }
        listed = (await client.get("/v1/models")).json()["data"]
        unknown = await client.post("/score", json={"items": ITEMS, "model": "nope"})
    async with make_client("llama") as single:  # model a served on its own, by today's single-model settings
        a_by_itself = (await single.post("/score", json={"items": ITEMS})).json()

    assert alone["a"]["rewards"] == a_by_itself["rewards"] and alone["a"]["fingerprint"] == a_by_itself["fingerprint"]
    assert default == alone["a"] and alone["a"]["model"] == "a" and alone["b"]["model"] == "b"
    assert alone["b"]["normalization"] == {"mean": 0.25, "std": 2.0}  # b's own settings from the file
    assert aliased["rewards"] == alone["b"]["rewards"] and aliased["fingerprint"] == alone["b"]["fingerprint"]
    assert alone["a"]["fingerprint"] != alone["b"]["fingerprint"]
    for name, formula in FORMULAS.items():
        body = ensembles[name]
        assert body["model"] == name and body["fingerprint"] not in (
            alone["a"]["fingerprint"],
            alone["b"]["fingerprint"],
        )
        for i, item in enumerate(body["items"]):
            members = [alone["a"]["rewards"][i], alone["b"]["rewards"][i]]
            assert item["members"] == {"a": members[0], "b": members[1]}  # bitwise each member's reward alone
            assert item["reward"] == pytest.approx(formula(members), rel=1e-12, abs=1e-12)
            assert item["std"] == pytest.approx(statistics.pstdev(members), rel=1e-12, abs=1e-12)
    assert len({e["fingerprint"] for e in ensembles.values()}) == len(FORMULAS)  # the aggregate is part of it
    cards = {card["id"]: card for card in listed}
    assert set(cards) == {"a", "b", *FORMULAS, "production"}
    assert cards["a"]["kind"] == "model" and cards["a"]["fingerprint"] == alone["a"]["fingerprint"]
    assert cards["a"]["format"] and cards["a"]["dtype"] == "float32" and cards["a"]["state"] == "ready"
    assert cards["uwo"]["members"] == ["a", "b"] and cards["uwo"]["aggregate"] == "uwo, lambda=0.5"
    assert cards["production"]["kind"] == "alias" and cards["production"]["root"] == "b"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "model_not_found" and unknown.json()["error"]["param"] == "model"


async def test_every_route_takes_the_model(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    pair = {"prompt": "Say hi", "response_a": "Hello there!", "response_b": "no"}
    group = {"prompt": "Say hi", "responses": ["Hello there!", "no"]}
    async with serving(models_file(tmp_path, checkpoints), checkpoints) as client:
        chat = [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hello there! How can I help you today?"},
        ]
        scored = (await client.post("/score", json={"model": "b", "items": [{"messages": chat}]})).json()
        compared = (await client.post("/compare", json={"model": "b", "pairs": [pair]})).json()
        ranked = (await client.post("/rank", json={"model": "b", "groups": [group]})).json()
        body = {"model": "b", "messages": chat, "use_activation": False}
        classified = (await client.post("/classify", json=body)).json()
        rewarded = await client.post("/models/mean/get_reward", json={"query": ["Say hi Hello there!"]})
        missing = await client.post("/models/nope/get_reward", json={"query": ["Say hi"]})
        info = (await client.get("/info", params={"model": "b"})).json()
    assert {scored["model"], compared["model"], ranked["model"], classified["model"]} == {"b"}
    assert classified["data"][0]["probs"] == scored["rewards"]
    raw_a = compared["pairs"][0]["a"]["reward"]  # /compare reads raw rewards; /rank b's normalized ones
    assert ranked["groups"][0]["rewards"][0] == pytest.approx((raw_a - 0.25) / 2.0, rel=1e-12)
    body = rewarded.json()
    assert rewarded.status_code == 200 and body["model"] == "mean"
    logs = body["extra_logs"]
    assert logs["reward_std"][0] == pytest.approx(abs(logs["reward_member_a"][0] - logs["reward_member_b"][0]) / 2)
    assert body["rewards"][0] == pytest.approx((logs["reward_member_a"][0] + logs["reward_member_b"][0]) / 2)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "model_not_found"
    assert info["fingerprint"] == scored["fingerprint"] and info["normalization"] == {"mean": 0.25, "std": 2.0}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[models.a]\npath = "x"\ncolour = 1\n', "models.a: unknown settings ['colour']"),
        ('[models.a]\npath = "x"\n[ensembles.e]\nmembers = ["a", "z"]\n', "members ['z'] are not in [models]"),
        ('[models.a]\npath = "x"\n[ensembles.e]\nmembers = ["a", "a"]\naggregate = "max"\n', "ensembles.e.aggregate"),
        ('default = "q"\n[models.a]\npath = "x"\n', "default 'q' is not a model"),
        ('[models.a]\npath = "x"\n[aliases]\na = "a"\n', "a name is used twice"),
        ("[models.a\n", "models.toml"),
    ],
)
def test_a_bad_models_file_is_one_line_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"models\.toml") as raised:
        ModelsFile.read(path)
    assert problem in str(raised.value) and "\n" not in str(raised.value)


async def test_a_model_the_file_cannot_load_fails_start_up(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f'[models.a]\npath = "{checkpoints["llama"]}"\n[models.b]\npath = "{tmp_path / "absent"}"\n')
    with pytest.raises(Exception, match="absent"):
        async with serving(path, checkpoints):
            pass


async def test_the_client_names_its_model_and_reads_an_ensembles_spread(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    from app.clients import AsyncRewardClient

    path = models_file(tmp_path, checkpoints)
    app = create_app(test_settings(checkpoints["llama"], models_file=path), wait=True)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with (
            AsyncRewardClient("http://t", model="min", transport=transport) as ensemble,
            AsyncRewardClient("http://t", model="a", transport=transport) as member,
        ):
            scored, alone = await ensemble.score(ITEMS), await member.score(ITEMS)
            ranked = await ensemble.rank([{"prompt": "Say hi", "responses": ["Hello!", "no"]}])
    assert scored.model == "min" and alone.model == "a" and scored.fingerprint != alone.fingerprint
    assert [i.members and i.members["a"] for i in scored.items] == alone.rewards
    assert all(i.std is not None and i.reward == min(i.members.values()) for i in scored.items if i.members)
    assert ranked.fingerprint == scored.fingerprint


async def test_verl_logs_an_ensembles_spread_and_members() -> None:
    from app.clients import verl
    from app.clients.results import ItemScore

    fields = verl._fields(ItemScore(0.5, 7, False, members={"a": 1.0, "b": 0.0}, std=0.5))
    assert fields == {
        "score": 0.5,
        "reward_num_tokens": 7.0,
        "reward_truncated": 0.0,
        "reward_monitor_warnings": 0.0,
        "reward_std": 0.5,
        "reward_member_a": 1.0,
        "reward_member_b": 0.0,
    }
    plain = {"score", "reward_num_tokens", "reward_truncated", "reward_monitor_warnings"}
    assert set(verl._fields(ItemScore(0.5, 7, False))) == plain
    chosen = verl._client("http://127.0.0.1:9", None, 5.0, "safe", "ppo-1")
    assert chosen.model == "safe" and chosen.run == "ppo-1"
    assert verl._client("http://127.0.0.1:9", None, 5.0, None, None).model is None
