"""The engine, pure: plans (layout and cost), the batcher that grows them, the hand-off to the model thread."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import pytest

from app.engine.batching import BatchPolicy, TokenBudgetQueue
from app.engine.handoff import Handoff
from app.model.plan import Plan, plan_of, prompt_of


@dataclass
class Tok:
    input_ids: list[int]
    prefix: int = 0
    token_type_ids: list[int] | None = None


@dataclass
class Entry:
    encoded: Tok
    name: str = ""
    abandoned: bool = False
    prompt: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt = prompt_of(self.encoded)


def item(prompt: list[int], reply: list[int]) -> Tok:
    return Tok([*prompt, *reply], prefix=len(prompt))


def drain(q: TokenBudgetQueue[Entry]) -> list[list[Entry]]:
    plans = []
    while planned := q.next_plan():
        plans.append(planned[0])
    return plans


def queue(tokens: int = 1000, items: int = 100, packed: bool = True) -> TokenBudgetQueue[Entry]:
    return TokenBudgetQueue(BatchPolicy(tokens, items, packed))


def test_a_packed_plan_lays_each_prompt_once_at_the_front() -> None:
    a, b, c = [1, 2, 3], [7, 8], [9]
    items = [item(a, [10, 11]), item(b, [12]), item(a, [13]), Tok([14, 15]), item(c, [16, 17])]
    plan = plan_of(items, packed=True)
    ids, positions, spans = plan.layout()
    assert ids == [*a, *b, *c, 10, 11, 12, 13, 14, 15, 16, 17]
    assert positions == [0, 1, 2, 0, 1, 0, 3, 4, 2, 3, 0, 1, 1, 2]
    assert spans[:3] == [(0, 0, 0, 3), (0, 0, 3, 2), (0, 0, 5, 1)]  # the prompts, each attending to itself
    assert spans[3:] == [(0, 3, 6, 2), (3, 2, 8, 1), (0, 3, 9, 1), (0, 0, 10, 2), (5, 1, 12, 2)]
    assert plan.cost == len(ids) == plan.real_tokens == 14
    assert sum(len(x.input_ids) for x in items) - plan.cost == len(a)  # the second copy of `a` is not computed


def test_a_prompt_no_other_item_has_still_runs_apart() -> None:
    """An item's path may not depend on its neighbours: alone or with a sibling, its prompt is its own span."""
    alone = plan_of([item([1, 2], [3])], packed=True).layout()[2]
    assert alone == [(0, 0, 0, 2), (0, 2, 2, 1)]


def test_cost_with_is_the_cost_after_add() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(100) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    for packed in (True, False):
        plan = Plan(packed)
        for _ in range(40):
            x = item(rng.choice(prompts), [rng.randrange(100) for _ in range(rng.randint(1, 20))])
            if rng.random() < 0.3:
                x = Tok(x.input_ids)
            expected = plan.cost_with(x)
            plan.add(x)
            assert plan.cost == expected
        if not packed:
            assert plan.cost == len(plan) * max(len(x.input_ids) for x in plan.items)


def test_oldest_first_within_the_budget_and_the_cap() -> None:
    q = queue(tokens=100)
    q.extend(Entry(Tok([1] * 30), str(i)) for i in range(5))
    assert [[e.name for e in p] for p in drain(q)] == [["0", "1", "2"], ["3", "4"]]
    q = queue(items=4)
    q.extend(Entry(Tok([1])) for _ in range(10))
    assert [len(p) for p in drain(q)] == [4, 4, 2]


def test_a_shared_prompt_is_counted_once_in_the_budget() -> None:
    q = queue(tokens=300)
    q.extend(Entry(item([5] * 80, [i] * 20)) for i in range(8))
    assert [len(p) for p in drain(q)] == [8]  # 80 + 8 x 20 = 240 tokens; whole items would fit 3
    q = queue(tokens=300, packed=False)
    q.extend(Entry(item([5] * 80, [i] * 20)) for i in range(8))
    assert [len(p) for p in drain(q)] == [3, 3, 2]  # padded: rows x longest


def test_an_item_longer_than_the_budget_still_runs_alone() -> None:
    q = queue(tokens=10)
    q.extend([Entry(Tok([1] * 50), "long"), Entry(Tok([1] * 5), "short")])
    assert [[e.name for e in p] for p in drain(q)] == [["long"], ["short"]]
    with pytest.raises(ValueError, match="smaller than one full-length item"):
        BatchPolicy(100, 8).check(max_length=128)


def test_abandoned_entries_are_dropped_not_planned() -> None:
    q = queue()
    entries = [Entry(Tok([i]), str(i)) for i in range(4)]
    entries[1].abandoned = entries[2].abandoned = True
    q.extend(entries)
    assert [e.name for p in drain(q) for e in p] == ["0", "3"] and q.dropped == 2
    q.extend(entries)
    assert q.prune() == 2 and len(q) == 2


def test_requeued_entries_go_back_to_the_front_in_order() -> None:
    q = queue(items=2)
    q.extend(Entry(Tok([i]), str(i)) for i in range(5))
    planned = q.next_plan()
    assert planned is not None
    assert q.replan(planned[0]).layout() == planned[1].layout()  # the same entries give the same plan
    q.requeue(planned[0])
    assert [[e.name for e in p] for p in drain(q)] == [["0", "1"], ["2", "3"], ["4"]]


def test_every_entry_is_planned_exactly_once_within_the_limits() -> None:
    rng = random.Random(1)
    prompts = [[rng.randrange(50) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    for packed in (True, False):
        q = queue(tokens=512, items=8, packed=packed)
        entries = [
            Entry(item(rng.choice(prompts), [rng.randrange(50)] * rng.randint(1, 200)), str(i)) for i in range(300)
        ]
        q.extend(entries)
        plans: list[Plan] = []
        names: list[str] = []
        while planned := q.next_plan():
            names += [e.name for e in planned[0]]
            plans.append(planned[1])
            assert [e.encoded for e in planned[0]] == planned[1].items  # the plan holds exactly its entries
        assert names == [e.name for e in entries]  # oldest first, each once
        assert all(len(p) <= 8 and (p.cost <= 512 or len(p) == 1) for p in plans)


def test_the_handoff_holds_one_value_and_gives_back_an_untaken_one() -> None:
    handoff: Handoff[int] = Handoff()
    assert handoff.reclaim() is None and not handoff.holding
    handoff.offer(1)
    assert handoff.holding
    with pytest.raises(AssertionError):
        handoff.offer(2)
    assert handoff.reclaim() == 1 and not handoff.holding  # taken back: the loop may grow it
    taken: list[int] = []
    thread = threading.Thread(target=lambda: taken.append(handoff.take()))
    thread.start()  # blocks until offered
    handoff.offer(3)
    thread.join(5)
    assert taken == [3] and handoff.reclaim() is None
