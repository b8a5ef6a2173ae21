"""The batching policy, with plain objects: budget, cap, length grouping, FIFO anchor, abandoned entries."""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.engine.batching import BatchPolicy, TokenBudgetQueue
from app.model.shapes import padded


@dataclass
class Item:
    length: int
    name: str = ""
    abandoned: bool = False
    prefix: int = 0
    prefix_key: str | None = None


def queue(**policy: object) -> TokenBudgetQueue[Item]:
    values: dict[str, object] = {"max_batch_tokens": 1000, "max_batch_size": 100, "batch_invariant": False}
    values.update(policy)
    return TokenBudgetQueue(BatchPolicy(**values))  # type: ignore[arg-type]


def drain(q: TokenBudgetQueue[Item]) -> list[list[Item]]:
    batches = []
    while batch := q.next_batch():
        batches.append(batch)
    return batches


def test_padded() -> None:
    assert [padded(n, 16) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]


def test_empty_queue_gives_empty_batch() -> None:
    assert queue().next_batch() == []


def test_token_budget_counts_padding() -> None:
    q = queue(max_batch_tokens=100)
    q.extend(Item(30) for _ in range(5))
    batches = drain(q)
    assert [len(b) for b in batches] == [3, 2]
    assert all(len(b) * max(i.length for i in b) <= 100 for b in batches)


def test_batch_size_cap() -> None:
    q = queue(max_batch_size=4)
    q.extend(Item(1) for _ in range(10))
    assert [len(b) for b in drain(q)] == [4, 4, 2]


def test_groups_similar_lengths_and_oldest_goes_first() -> None:
    q = queue(max_batch_tokens=400)
    lengths = [100, 10, 100, 10, 100, 10, 100, 10]
    q.extend(Item(n, str(i)) for i, n in enumerate(lengths))
    batches = drain(q)
    assert batches[0][0].name == "0"  # the oldest item anchors the first batch
    assert [sorted(i.length for i in b) for b in batches] == [[100] * 4, [10] * 4]


def test_padding_efficiency_floor_keeps_short_items_apart() -> None:
    q = queue(min_padding_efficiency=0.8)
    q.extend([Item(100, "long"), Item(10, "short"), Item(95, "long2")])
    batches = drain(q)
    assert [[i.name for i in b] for b in batches] == [["long", "long2"], ["short"]]
    greedy = queue(min_padding_efficiency=0.0)
    greedy.extend([Item(100), Item(10), Item(95)])
    assert [len(b) for b in drain(greedy)] == [3]


def test_efficiency_is_measured_against_own_padding() -> None:
    """Tiny items padded to the multiple alone must still batch together."""
    q = queue(pad_to_multiple_of=16, min_padding_efficiency=0.9)
    q.extend(Item(n) for n in (3, 5, 7, 9))
    assert [len(b) for b in drain(q)] == [4]


def test_lookahead_bounds_reordering() -> None:
    q = queue(max_batch_tokens=200, lookahead=2)
    q.extend([Item(100, "a"), Item(10, "b"), Item(100, "c")])
    first = q.next_batch()
    assert [i.name for i in first] == ["a", "b"]  # "c" was outside the window


def test_abandoned_entries_are_dropped_not_computed() -> None:
    q = queue()
    items = [Item(10, str(i)) for i in range(4)]
    items[1].abandoned = items[2].abandoned = True
    q.extend(items)
    assert [i.name for b in drain(q) for i in b] == ["0", "3"]
    assert q.dropped == 2


def test_every_item_is_scheduled_exactly_once() -> None:
    import random

    rng = random.Random(0)
    q = queue(max_batch_tokens=512, max_batch_size=8, pad_to_multiple_of=8, min_padding_efficiency=0.7, lookahead=16)
    items = [Item(rng.randint(1, 500), str(i)) for i in range(300)]
    q.extend(items)
    batches = drain(q)
    names = [i.name for b in batches for i in b]
    assert sorted(names) == sorted(i.name for i in items)
    for b in batches:
        assert len(b) <= 8 and len(b) * padded(max(i.length for i in b), 8) <= 512
        own = sum(padded(i.length, 8) for i in b)
        assert len(b) == 1 or own >= 0.7 * len(b) * padded(max(i.length for i in b), 8)


def test_a_shared_prompt_is_counted_once_in_the_budget() -> None:
    q = queue(max_batch_tokens=300)
    q.extend(Item(100, str(i), prefix=80, prefix_key="a") for i in range(8))
    assert [len(b) for b in drain(q)] == [8]  # 80 + 8 x 20 = 240 tokens; whole items would fit 3 per batch
    q = queue(max_batch_tokens=300, share_prefixes=False)
    q.extend(Item(100, str(i), prefix=80, prefix_key="a") for i in range(8))
    assert [len(b) for b in drain(q)] == [3, 3, 2]


def test_replies_of_very_different_length_split_a_group() -> None:
    q = queue(min_padding_efficiency=0.8)
    lengths = [60, 200, 60, 60]  # prompt 50, replies 10, 150, 10, 10
    q.extend(Item(n, str(i), prefix=50, prefix_key="a") for i, n in enumerate(lengths))
    batches = drain(q)
    assert [sorted(i.name for i in b) for b in batches] == [["0", "2", "3"], ["1"]]


def test_groups_of_similar_shape_join_and_whole_items_run_apart() -> None:
    """A whole item in a shared batch would attend over every prompt's cache: it waits for a batch of whole items."""
    q = queue(max_batch_tokens=1000, batch_invariant=False)
    q.extend(Item(40 + i, f"a{i}", prefix=30, prefix_key="a") for i in range(4))
    q.extend(Item(40 + i, f"b{i}", prefix=30, prefix_key="b") for i in range(4))
    q.extend([Item(12, "lone", prefix=10, prefix_key="c")])  # no sibling: a whole 12-token item
    assert [sorted(i.name for i in b) for b in drain(q)] == [["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"], ["lone"]]


def test_batch_invariant_every_prompt_runs_apart() -> None:
    """Batch-invariant, an item's path may not depend on its neighbours: a prompt no other item shares still runs in
    the prompt pass, so the lone item joins the shared batch."""
    q = queue(max_batch_tokens=1000, batch_invariant=True)
    q.extend(Item(40 + i, f"a{i}", prefix=30, prefix_key="a") for i in range(4))
    q.extend([Item(12, "lone", prefix=10, prefix_key="c"), Item(300, "whole")])  # packed: lengths and kinds mix
    assert [sorted(i.name for i in b) for b in drain(q)] == [["a0", "a1", "a2", "a3", "lone", "whole"]]
    q = queue(max_batch_tokens=400, batch_invariant=True)  # own tokens, oldest first: 76 + 12 + 300 (+ 30)
    q.extend(Item(40 + i, f"a{i}", prefix=30, prefix_key="a") for i in range(4))
    q.extend([Item(12, "lone", prefix=10, prefix_key="c"), Item(300, "whole"), Item(30, "next")])
    assert [sorted(i.name for i in b) for b in drain(q)] == [["a0", "a1", "a2", "a3", "lone", "whole"], ["next"]]
    assert BatchPolicy(1000, 8, batch_invariant=True, block_rows=64).layout == (1, True, 64)
    assert BatchPolicy(1000, 8, batch_invariant=False, block_rows=64).layout == (1, True, None)


def test_fitting_decides_invariance_and_block_rows_once() -> None:
    @dataclass
    class Model:
        device_type: str
        can_be_invariant: bool = True
        can_share_prefixes: bool = True
        max_length: int = 256

    policy = BatchPolicy(1000, 8)
    assert policy.for_model(Model("cpu")).layout == (1, True, 512)
    assert policy.for_model(Model("cuda")).layout == (1, True, 1024)
    assert replace(policy, block_rows=96).for_model(Model("cuda")).layout == (1, True, 96)
    assert policy.for_model(Model("cpu", can_be_invariant=False)).layout == (1, True, None)
    assert policy.for_model(Model("cpu", can_share_prefixes=False)).layout == (1, False, 512)
