"""Ensemble members that share a base (what `reward-server train --ensemble` writes) run it once per item on one
worker, and each member's reward stays bitwise the one it gives served alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.model.family import load_shared_base, trained_blocks
from app.model.loading import load_reward_model
from app.model.plan import plan_of
from app.model.recipe import ScoringInput
from tests import tiny
from tests.conftest import direct, serving

ITEMS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Name a colour.", "response": "Blue, like the sky on a clear summer day."},
    {"prompt": "What is 2+2?", "response": "Four, of course."},
]


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny.build_members(tmp_path_factory.mktemp("members"), 3)


def models_file(tmp_path: Path, members: list[Path], share: bool = True) -> Path:
    path = tmp_path / f"models-{share}.toml"
    entries = "".join(f'[models.m{k}]\npath = "{p}"\n' for k, p in enumerate(members))
    path.write_text(
        f"share_bases = {str(share).lower()}\n{entries}"
        '[ensembles.all]\nmembers = ["m0", "m1", "m2"]\naggregate = "uwo"\nlambda = 0.5\n'
    )
    return path


async def test_members_share_one_pass_and_each_gives_its_reward_alone(tmp_path: Path, members: list[Path]) -> None:
    alone = []
    for path in members:
        async with serving(path) as (_, client):
            alone.append((await client.post("/score", json={"items": ITEMS})).json())
    for share in (True, False):
        async with serving(members[0], models_file=models_file(tmp_path, members, share)) as (app, client):
            got = [(await client.post("/score", json={"items": ITEMS, "model": f"m{k}"})).json() for k in range(3)]
            ensemble = (await client.post("/score", json={"items": ITEMS, "model": "all"})).json()
            workers = len(app.state.registry.workers)
            info = (await client.get("/info", params={"model": "m2"})).json()
        assert workers == (1 if share else 3)
        for k, body in enumerate(got):
            assert body["rewards"] == alone[k]["rewards"]  # bitwise
            assert body["fingerprint"] == alone[k]["fingerprint"] and body["model"] == f"m{k}"
        for i, item in enumerate(ensemble["items"]):
            assert item["members"] == {f"m{k}": alone[k]["rewards"][i] for k in range(3)}
        assert info["model_path"] == str(members[2])
    for k, path in enumerate(members):  # and each is right: a plain forward of the member loaded on its own
        reference = direct(load_reward_model(path, dtype="float32", device="cpu"), [tiny_input(x) for x in ITEMS])
        assert alone[k]["rewards"] == pytest.approx(reference, abs=1e-5)
    assert len({tuple(a["rewards"]) for a in alone}) == 3  # the members do differ


def tiny_input(item: dict[str, str]) -> ScoringInput:
    return ScoringInput(item["prompt"], item["response"])


def test_only_members_that_retrained_the_same_blocks_of_one_base_fuse(tmp_path: Path, members: list[Path]) -> None:
    assert trained_blocks(members, None) == (1,)
    other = tiny.build_members(tmp_path / "other", 1, seed=6)[0]  # another base
    assert trained_blocks([members[0], other], None) is None
    partial = shutil.copytree(members[1], tmp_path / "partial")  # a delta over other parameters
    manifest = json.loads((partial / "reward_manifest.json").read_text())
    manifest["backbone_delta"] = None
    (partial / "reward_manifest.json").write_text(json.dumps(manifest))
    assert trained_blocks([members[0], partial], None) is None
    assert load_shared_base(["a", "b"], [members[0], partial], dtype="float32", device="cpu") is None
    fused = load_shared_base(["a", "b", "c"], members, dtype="float32", device="cpu")
    assert fused is not None and [i.model_path for i in fused.members] == [str(p) for p in members]
    encoded = fused.encoder.encode_batch([tiny_input(x) for x in ITEMS])
    rows = fused.run(plan_of(encoded, fused.packs))
    assert [len(row) for row in rows] == [3] * len(ITEMS)
    for k, path in enumerate(members):  # each column bitwise the member's own model, prepared the same way
        assert [row[k] for row in rows] == load_reward_model(path, dtype="float32", device="cpu").score(encoded)
