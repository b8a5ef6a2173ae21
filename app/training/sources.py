"""What `reward-server eval` scores with: a checkpoint in this process, or a running server over HTTP (any model it
serves, `--name`); both give the same numbers. An ensemble's answer carries its members' rewards, so its report
adds each member's metrics and its accuracy by uncertainty (`app.training.ensemble`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.model.recipe import ScoringInput
from app.training.data import PreferencePair
from app.training.ensemble import ensemble_report
from app.training.evaluate import evaluate


def checkpoint_report(
    pairs: Sequence[PreferencePair], model: Path, dtype: str, device: str, max_length: int | None
) -> dict[str, Any]:
    from app.engine.offline import score_offline, served_fingerprint
    from app.model.loading import load_reward_model

    loaded = load_reward_model(model, dtype=dtype, device=device, max_length=max_length)
    report = evaluate(pairs, lambda inputs: score_offline(loaded, inputs), progress=True)
    report["max_length"] = loaded.max_length
    report["fingerprint"], report["versions"] = served_fingerprint(loaded), loaded.info.versions
    report["model_fingerprint"], report["kernels"] = loaded.info.model_fingerprint, loaded.prepared.model_dump()
    return report


def server_report(pairs: Sequence[PreferencePair], url: str, api_key: str | None, name: str | None) -> dict[str, Any]:
    from app.clients import RewardClient

    members: dict[str, list[float]] = {}
    combined: list[float] = []

    def score(inputs: list[ScoringInput]) -> list[float]:
        result = client.score([(x.prompt, x.response) for x in inputs])
        for item in result.items:
            for member, reward in (item.members or {}).items():
                members.setdefault(member, []).append(reward)
        combined.extend(result.rewards)
        return result.rewards

    with RewardClient(url, api_key=api_key, timeout=600, model=name) as client:
        report = evaluate(pairs, score, progress=True)
        info = client.info()
    report["max_length"] = info["max_length"]
    report["fingerprint"], report["versions"] = info["fingerprint"], info["versions"]
    report["model_fingerprint"], report["kernels"] = info["model_fingerprint"], info["kernels"]
    if members:
        report["ensemble"] = ensemble_report(members, combined, name or "the server's default")
    return report
