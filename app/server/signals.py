"""What the reward-hacking monitor keeps of each scored item, and the signals of a window of them:

- `reward_mean`, `reward_std`, `reward_p10/p50/p90`, and `reward_drift`: the mean's move from the run's baseline (its
  first windows) in baseline standard deviations;
- `length_mean` (reply words) and `length_corr`, corr(reward, reply length): a policy that learns "longer is
  better" raises both;
- `group_collapse`: the share of `/rank` groups whose rewards all but agree (spread under a tenth of the baseline's
  reward std: GRPO then has no advantage to learn from), and `group_length_corr`, the mean within-group
  corr(reward, length), which a length bias shows even when prompts differ;
- `truncated`: the share of items cut to fit the model; `repetition`: the share of replies repeating themselves
  (under half their word 3-grams distinct);
- `boilerplate`: the share of replies opening or closing with a phrase (4 words, case aside) that the replies to a
  quarter or more of the window's prompts (3 at least) use too: the hedges, flattery and sign-offs a policy learns to
  attach to everything; replies to one prompt share its words, so a phrase counts once per prompt;
- `ood`: the share of items whose last-token state (the one the head reads) lies past the 99th percentile of the
  checkpoint's eval set (`app.model.reference`; only where the checkpoint has one), and `distance_mean`, the items'
  mean distance in units of that percentile, which moves before many items are past it."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from app.model.recipe import Item, ScoringInput

SIGNALS = (
    "reward_mean",
    "reward_std",
    "reward_p10",
    "reward_p50",
    "reward_p90",
    "reward_drift",
    "length_mean",
    "length_corr",
    "group_collapse",
    "group_length_corr",
    "truncated",
    "repetition",
    "boilerplate",
    "ood",
    "distance_mean",
)
PHRASE, EDGE = 4, 12  # boilerplate: phrases of 4 words, among a reply's first and last 12


@dataclass(frozen=True, slots=True)
class Observed:
    """One scored item, as the monitor keeps it."""

    reward: float
    length: int  # reply words (a client-formatted sequence: its tokens)
    truncated: bool
    repeated: bool
    group: int | None  # its /rank group, numbered across the run
    distance: float | None = None  # from the checkpoint's reference states; past 1: out of distribution
    prompt: int | None = None  # its prompt's hash (None: a client-formatted sequence, no prompt known)
    phrases: tuple[int, ...] = ()  # hashes of the phrases opening and closing its reply


def repeated(words: Sequence[str]) -> bool:
    """Under half of the reply's word 3-grams are distinct (a reply of fewer than 12 words never is)."""
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) >= 10 and len(set(grams)) < 0.5 * len(grams)


def phrases(words: Sequence[str]) -> tuple[int, ...]:
    """The distinct phrases among the reply's first and last `EDGE` words, case aside, hashed (this process's hash:
    never stored)."""
    words = [w.lower() for w in words]
    parts = [words] if len(words) <= 2 * EDGE else [words[:EDGE], words[-EDGE:]]
    return tuple({hash(tuple(part[i : i + PHRASE])) for part in parts for i in range(len(part) - PHRASE + 1)})


def observe(
    item: Item, reward: float, num_tokens: int, truncated: bool, group: int | None, distance: float | None = None
) -> Observed:
    if isinstance(item, ScoringInput):
        words = (item.response if item.steps is None else "\n".join(item.steps)).split()  # once, for every signal
        prompt = hash(item.prompt if isinstance(item.prompt, str) else repr(item.prompt))
        return Observed(reward, len(words), truncated, repeated(words), group, distance, prompt, phrases(words))
    return Observed(reward, num_tokens, truncated, False, group, distance)


def mean_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(known) if known else None


def _corr(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(xs, ys)


def boilerplate(items: Sequence[Observed]) -> float | None:
    """The `boilerplate` share; None under 3 distinct prompts (nothing to share a phrase across)."""
    by_prompt: dict[int, set[int]] = {}
    for o in items:
        if o.prompt is not None:
            by_prompt.setdefault(o.prompt, set()).update(o.phrases)
    if len(by_prompt) < 3:
        return None
    used = Counter(phrase for seen in by_prompt.values() for phrase in seen)
    need = max(3, math.ceil(len(by_prompt) / 4))
    common = {phrase for phrase, prompts in used.items() if prompts >= need}
    known = [o for o in items if o.prompt is not None]
    return sum(not common.isdisjoint(o.phrases) for o in known) / len(known)


def signals(
    items: Sequence[Observed], base_mean: float | None = None, base_std: float | None = None
) -> dict[str, float | None]:
    """A window's signals; `base_mean`, `base_std`: the run's baseline reward mean and std (None: no baseline yet)."""
    rewards = [o.reward for o in items]
    lengths = [float(o.length) for o in items]
    q = statistics.quantiles(rewards, n=10, method="inclusive") if len(rewards) > 1 else rewards * 9
    out: dict[str, float | None] = {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "reward_p10": q[0],
        "reward_p50": q[4],
        "reward_p90": q[8],
        "length_mean": statistics.fmean(lengths),
        "length_corr": _corr(rewards, lengths),
        "truncated": sum(o.truncated for o in items) / len(items),
        "repetition": sum(o.repeated for o in items) / len(items),
        "boilerplate": boilerplate(items),
    }
    measured = [o.distance for o in items if o.distance is not None]
    out["ood"] = sum(d > 1 for d in measured) / len(measured) if measured else None
    out["distance_mean"] = statistics.fmean(measured) if measured else None
    mean = out["reward_mean"]
    out["reward_drift"] = (mean - base_mean) / base_std if base_std and base_mean is not None else None
    groups: dict[int, list[Observed]] = {}
    for o in items:
        if o.group is not None:
            groups.setdefault(o.group, []).append(o)
    sized = [g for g in groups.values() if len(g) > 1]
    scale = base_std if base_std else out["reward_std"]
    collapsed = [statistics.pstdev([o.reward for o in g]) <= 0.1 * (scale or 0.0) for g in sized]
    out["group_collapse"] = sum(collapsed) / len(sized) if sized else None
    within_r, within_l = [], []  # deviations from each group's means: the pooled within-group correlation
    for g in sized:
        mean_r, mean_l = statistics.fmean(o.reward for o in g), statistics.fmean(o.length for o in g)
        within_r += [o.reward - mean_r for o in g]
        within_l += [o.length - mean_l for o in g]
    out["group_length_corr"] = _corr(within_r, within_l)
    return out
