"""What `reward-server eval` scores with: a checkpoint in this process, or a running server over HTTP (any model it
serves, `--name`); both give the same numbers. An ensemble's answer carries its members' rewards, so its report
adds each member's metrics and its accuracy by uncertainty (`app.training.ensemble`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from app.model.recipe import ScoringInput
from app.model.reference import Reference, fit, states_of
from app.training.data import PreferencePair
from app.training.ensemble import ensemble_report
from app.training.evaluate import evaluate

REFERENCE_ITEMS = 1024


def checkpoint_report(
    pairs: Sequence[PreferencePair], model: Path, dtype: str, device: str, max_length: int | None
) -> tuple[dict[str, Any], Reference | None]:
    """The report, and the checkpoint's reference for the monitor (`app.model.reference`; None for a classifier
    head, which reads no last-token state), fitted on the first `REFERENCE_ITEMS` items."""
    from app.engine.offline import score_offline, served_fingerprint
    from app.model.loading import load_reward_model

    loaded = load_reward_model(model, dtype=dtype, device=device, max_length=max_length)
    report = evaluate(pairs, lambda inputs: score_offline(loaded, inputs), progress=True)
    report["max_length"] = loaded.max_length
    report["fingerprint"], report["versions"] = served_fingerprint(loaded), loaded.info.versions
    report["model_fingerprint"], report["kernels"] = loaded.info.model_fingerprint, loaded.prepared.model_dump()
    if loaded.module.pooling != "last_token":
        return report, None
    items = [x for pair in pairs for x in pair.inputs()][:REFERENCE_ITEMS]
    flat = [r for pair in zip(report["rewards"]["chosen"], report["rewards"]["rejected"], strict=True) for r in pair]
    states = states_of(loaded, loaded.encoder.encode_batch(items))
    lengths = [len(x.response.split()) for x in items]
    return report, fit(states, flat[: len(items)], lengths)


class Scored(Protocol):
    """What the HTTP client's `score` returns (`app.clients.ScoreResult`), as read here."""

    @property
    def rewards(self) -> Sequence[float]: ...

    @property
    def items(self) -> Sequence[Any]: ...


def server_report(
    pairs: Sequence[PreferencePair],
    score: Callable[[list[tuple[Any, str]]], Scored],
    info: Callable[[], dict[str, Any]],
    name: str | None,
) -> dict[str, Any]:
    """`score`, `info`: a `RewardClient`'s (for the served model `name`), which the CLI builds."""
    members: dict[str, list[float]] = {}
    combined: list[float] = []

    def scorer(inputs: list[ScoringInput]) -> list[float]:
        result = score([(x.prompt, x.response) for x in inputs])
        for item in result.items:
            for member, reward in (item.members or {}).items():
                members.setdefault(member, []).append(reward)
        combined.extend(result.rewards)
        return list(result.rewards)

    report = evaluate(pairs, scorer, progress=True)
    served = info()
    report["max_length"] = served["max_length"]
    report["fingerprint"], report["versions"] = served["fingerprint"], served["versions"]
    report["model_fingerprint"], report["kernels"] = served["model_fingerprint"], served["kernels"]
    if members:
        report["ensemble"] = ensemble_report(members, combined, name or "the server's default")
    return report
