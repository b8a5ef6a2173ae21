"""The reward-hacking monitor: runs are kept apart (named, by key, bounded), windows close with their signals, and a
scripted policy whose replies drift (groups that stop differing, repeated text, replies past the model's length)
raises each signal's warning in the window after its onset (two windows running), through the server as a trainer
calls it, while a clean run raises none in 200 windows (0 false alarms over every rule)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from app.model.recipe import ScoringInput
from app.server.monitor import Monitor, run_of
from app.server.signals import Observed, boilerplate, observe, phrases, repeated, signals
from tests.conftest import ROOT, serving

PAIRS = [json.loads(line) for f in ("dev", "train") for line in (ROOT / f"examples/data/{f}.jsonl").open()]
PROMPTS = [p["prompt"] for p in PAIRS[:16] if len(p["prompt"]) <= 120]  # dev's
REPLIES = [r for p in PAIRS for r in (p["chosen"], p["rejected"]) if len(r) <= 200]  # fit max_length, drifted too
WINDOW = 32  # items: 4 /rank groups of 8


def test_runs_are_named_by_header_query_or_key_and_bounded() -> None:
    assert run_of("ppo-7", "other", "k") == "ppo-7" and run_of(None, "grpo-1", "k") == "grpo-1"
    assert run_of(None, None, "secret").startswith("key:") and "secret" not in run_of(None, None, "secret")
    assert run_of(None, None, None) == "default"
    monitor = Monitor(window=8, max_runs=2, baseline=1)
    for name in ("a", "b", "a", "c"):  # b is the least recently scored when c arrives
        monitor.record(name, [Observed(0.0, 3, False, False, None)])
    assert list(monitor.runs) == ["a", "c"]


def test_signals_of_a_window() -> None:
    items = [Observed(float(n), n, n > 8, False, n % 2) for n in range(1, 11)]
    got = signals(items)
    assert got["length_corr"] == pytest.approx(1.0) and got["truncated"] == pytest.approx(0.2)
    assert got["reward_mean"] == pytest.approx(5.5) and got["reward_drift"] is None  # no baseline yet
    assert got["group_length_corr"] == pytest.approx(1.0) and got["group_collapse"] == 0.0
    assert repeated(("the cat sat " * 6).split())
    assert not repeated(["a", "reply", "that", "says", "one", "thing", "once", "and", "then", "stops", "here", "fine"])


def test_boilerplate_is_a_phrase_shared_across_prompts_not_within_one() -> None:
    def item(prompt: str, reply: str) -> Observed:
        return observe(ScoringInput(prompt, reply), 0.0, 9, False, None)

    hedge = "I might be wrong, but "
    replies = ["cats purr when content", "the sea is salty today", "seven is a prime number", "tea needs hot water"]
    assert boilerplate([item(p, r) for p, r in zip("abcd", replies, strict=True)]) == 0.0
    hedged = [item(p, hedge + r) for p, r in zip("abc", replies[:3], strict=True)] + [item("d", replies[3])]
    assert boilerplate(hedged) == 0.75  # the phrase opens replies to 3 of the 4 prompts
    one_prompt = [item("a", hedge + r) for r in replies] + [item(p, r) for p, r in zip("bcd", replies[1:], strict=True)]
    assert boilerplate(one_prompt) == 0.0  # shared by one prompt's replies only: that prompt's words, not boilerplate
    assert boilerplate(hedged[:2]) is None
    assert phrases(["One", "two", "three", "Four"]) == phrases(["one", "two", "three", "four"])
    assert len(phrases(["w"] * 1000)) == 1 and len(phrases([str(n) for n in range(1000)])) == 2 * (12 - 4 + 1)


def policy(step: int, rng: random.Random) -> list[dict[str, Any]]:
    """One GRPO step: 4 prompts x 8 replies. Steps 0-5 clean (replies drawn from held-aside pairs); from step 6 every
    reply of a group is the same (GRPO's spread collapses); from 8 they open and close with hedges; from 10 they repeat
    a phrase; from 14 they run past the model's max_length."""
    groups, drawn = [], rng.sample(REPLIES, 32)  # distinct replies, as a policy's are
    for g, prompt in enumerate(rng.sample(PROMPTS, 4)):
        replies = drawn[8 * g : 8 * g + 8]
        if step >= 6:
            replies = [replies[0]] * 8
        if step >= 8:
            replies = [f"I might be wrong, but {reply} Please double-check this; I can't be sure." for reply in replies]
        if step >= 10:
            replies = [f"{reply} I am sure. I am sure. I am sure. I am sure. I am sure." * 2 for reply in replies]
        if step >= 14:
            replies = [reply + " and so on" * 200 for reply in replies]
        groups.append({"prompt": prompt, "responses": replies})
    return groups


ONSETS = {"group_collapse": 6, "boilerplate": 8, "repetition": 10, "truncated": 14}


async def test_a_drifting_policy_raises_each_signal_and_a_clean_one_none(checkpoints: dict[str, Path]) -> None:
    rng = random.Random(0)
    async with serving(checkpoints["llama"], monitor_window=WINDOW) as (_, client):
        first_warned: dict[str, int] = {}
        for step in range(18):
            answer = await client.post("/rank", json={"groups": policy(step, rng)}, headers={"X-Run-Id": "hacked"})
            assert answer.status_code == 200
            for warning in answer.json()["warnings"]:
                first_warned.setdefault(warning.split(":")[0], step)
            if answer.json()["warnings"]:
                assert answer.headers["x-reward-warnings"]
        for step in range(20):  # a clean run beside it, under its own name (`?run=`, as OpenRLHF's URL would)
            clean = await client.post("/rank?run=clean", json={"groups": policy(step % 6, rng)})
            assert clean.json()["warnings"] == []
        pool = [{"prompt": p, "response": r} for p in PROMPTS for r in REPLIES]  # every clean item, scored once
        scored = [s for at in range(0, len(pool), 512) for s in await _items(client, pool[at : at + 512])]
        state = (await client.get("/monitor")).json()
        metrics = (await client.get("/metrics")).text
    for signal, onset in ONSETS.items():
        assert first_warned[signal] == onset + 1, (signal, first_warned)
    hacked, clean_run = state["runs"]["hacked"], state["runs"]["clean"]
    assert hacked["items"] == 18 * WINDOW and len(hacked["windows"]) == 18 and hacked["baseline"] == [0, 1]
    assert clean_run["warnings"] == [] and not any(w["warnings"] for w in clean_run["windows"])
    assert hacked["signals"]["truncated"] == 1.0 and hacked["warnings"]
    assert 'reward_monitor_signal{run="hacked",signal="group_collapse"}' in metrics
    assert 'reward_monitor_warnings{run="hacked"}' in metrics
    # the false-alarm rate: 200 more clean windows, drawn from the scored pool (a reward depends on its item only)
    monitor, alarms = Monitor(window=WINDOW, max_runs=1, baseline=2), 0
    of = {(item["prompt"], item["response"]): s for item, s in zip(pool, scored, strict=True)}
    for _ in range(200):
        first = monitor.next_group("clean", 4)
        observed = [
            observe(ScoringInput(g["prompt"], r), of[g["prompt"], r]["reward"], 0, of[g["prompt"], r]["truncated"], n)
            for n, g in enumerate(policy(0, rng), start=first)
            for r in g["responses"]
        ]
        alarms += len(monitor.record("clean", observed))
    assert alarms == 0 and len(monitor.runs["clean"].windows) == 200


async def _items(client: Any, items: list[dict[str, str]]) -> list[dict[str, Any]]:
    return (await client.post("/score", json={"items": items})).json()["items"]


async def test_the_monitor_can_be_off(checkpoints: dict[str, Path]) -> None:
    async with serving(checkpoints["llama"], monitor=False) as (_, client):
        body = (await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}]})).json()
        assert body["warnings"] == [] and (await client.get("/monitor")).json()["runs"] == {}


def test_the_grafana_dashboard_reads_what_the_server_exports() -> None:
    import re

    from app.server.metrics import Metrics
    from app.server.signals import SIGNALS

    exported = {metric.name for metric in Metrics().registry.collect()}
    queries = [
        t["expr"]
        for p in json.loads((ROOT / "deploy/grafana/reward-monitor.json").read_text())["panels"]
        for t in p["targets"]
    ]
    assert queries and all(re.match(r"\w+", q)[0] in exported for q in queries)  # type: ignore[index]
    named = {m for q in queries for m in re.findall(r'signal="(\w+)"', q)}
    assert named and named <= set(SIGNALS)


async def test_replies_unlike_the_eval_set_are_out_of_distribution(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """`reward-server eval` fits the reference; stored in the checkpoint's eval/ it changes no reward and no
    fingerprint, and text from another domain (hex dumps) raises the `ood` warning at its second window."""
    import shutil

    from app.model.reference import write
    from app.training.data import load_pairs
    from app.training.sources import checkpoint_report

    path = shutil.copytree(checkpoints["llama"], tmp_path / "m")
    pairs = load_pairs(ROOT / "examples/data/train.jsonl")
    _, reference = checkpoint_report(pairs, path, "float32", "cpu", None)
    assert reference is not None and reference.items == 2 * len(pairs)
    items = [{"prompt": p, "response": r} for p in PROMPTS[:4] for r in REPLIES[:8]]
    async with serving(path) as (_, client):
        plain = (await client.post("/score", json={"items": items})).json()
    write(reference, path / "eval")
    rng = random.Random(2)
    hexdump = [{"prompt": p, "response": " ".join(hex(rng.randrange(1 << 32)) for _ in range(30))} for p in PROMPTS]
    async with serving(path, monitor_window=WINDOW) as (app, client):
        probed = (await client.post("/score", json={"items": items})).json()
        assert app.state.registry.resolve(None).readout.distance == 1
        said = []
        for step in range(7):
            body = {"items": items if step < 3 else [hexdump[i % len(hexdump)] for i in range(WINDOW)]}
            said.append((await client.post("/score", json=body, headers={"X-Run-Id": "ood"})).json()["warnings"])
        windows = (await client.get("/monitor")).json()["runs"]["ood"]["windows"]
    assert probed["rewards"] == plain["rewards"] and probed["fingerprint"] == plain["fingerprint"]
    assert all(w["signals"]["ood"] <= 0.1 for w in windows[:3]) and windows[3]["signals"]["ood"] == 1.0
    assert said[:4] == [[], [], [], []] and any(w.startswith("ood:") for w in said[4])  # two windows running


def test_the_checkpoints_reference_warns_only_past_wide_margins() -> None:
    from app.server.monitor import beyond_reference

    reference = {"reward_mean": 0.0, "reward_std": 1.0, "length_corr": 0.1}
    assert beyond_reference({"reward_mean": 3.9, "length_corr": 0.59}, reference) == []
    said = beyond_reference({"reward_mean": 4.5, "length_corr": 0.7}, reference)
    assert [w.split(":")[0] for w in said] == ["reward_mean", "length_corr"]
    monitor = Monitor(window=4, max_runs=1, baseline=1)
    far = [Observed(9.0, n, False, False, None) for n in range(4)]
    assert monitor.record("r", far, reference) and monitor.snapshot()["runs"]["r"]["reference"] == reference


def test_states_come_back_in_the_items_order(load: Any) -> None:
    import torch

    from app.model.reference import states_of

    model = load("llama")
    items = model.encoder.encode_batch([ScoringInput(p, r) for p in PROMPTS[:2] for r in REPLIES[:5]])
    together = states_of(model, items, batch=4)  # sorted by length inside, batched with padding
    alone = torch.cat([states_of(model, [item]) for item in items])
    assert together.shape == (10, 32) and torch.allclose(together, alone, atol=1e-5)


def test_a_runs_memory_stays_bounded_however_long_it_runs() -> None:
    """Windows past `WINDOWS_KEPT` go (the page draws the last 500): 1,100 windows hold what 500 did, under 2 MB."""
    import tracemalloc

    from app.server.monitor import WINDOWS_KEPT

    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    monitor, held = Monitor(window=16, max_runs=1, baseline=2), {}
    tracemalloc.start()
    try:
        for window in range(1100):
            first = monitor.next_group("long", 2)
            items = [ScoringInput(f"p{rng.randrange(50)}", " ".join(rng.choices(words, k=40))) for _ in range(16)]
            monitor.record("long", [observe(x, rng.random(), 0, False, first + i // 8) for i, x in enumerate(items)])
            if window + 1 in (WINDOWS_KEPT, 1100):
                held[window + 1] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(monitor.runs["long"].windows) == WINDOWS_KEPT
    assert held[1100] < 1.05 * held[WINDOWS_KEPT] and held[1100] < 2e6, held
