"""Model numerics: every reward equals a direct forward of its item (float32, within summation order), and is
bitwise a function of the item alone, whatever its batch, order, neighbours or concurrency, in bf16 as in float32;
the start-up probe's choices and evidence."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine.offline import score_offline, served_fingerprint
from app.model import invariant
from app.model.collate import last_real_index
from app.model.info import Kernels
from app.model.loading import load_reward_model
from app.model.plan import plan_of
from app.model.recipe import Formatted, ScoringInput
from app.model.reward_model import RewardModel
from tests.conftest import direct

rng = random.Random(1)
WORDS = "the quick brown fox jumps over a lazy dog near river bank under seven bright winter stars".split(" ")  # noqa: SIM905
TOL = 1e-4  # float32: a prompt's keys read from the row's front sum attention in another order than one pass
DECODERS = ["llama", "gpt2", "value_head", "peft", "openrlhf"]


def words(n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


PROMPTS = [words(n) for n in (3, 25, 70)]
# three prompts each with replies of many lengths (a GRPO step), one prompt no other item has, items of 2-200 tokens
ITEMS = [ScoringInput(p, words(n)) for p in PROMPTS for n in (1, 4, 17, 40, 90)] + [ScoringInput(words(9), words(60))]


def if_kernels_allow(kernels: Kernels) -> None:
    """Where the start-up probe measured rows that move (a linear whose rows move with their place even in a
    fixed-shape call, or items alone != together: seen with the kernels capped at AVX2 on an AVX-512 Xeon, float32),
    the server serves stock kernels and says so: skip, with the probe's evidence. Everywhere else the claim is
    checked with `==`."""
    if "move with their place" in kernels.note or "!= alone" in kernels.note:
        pytest.skip(f"the probe found this CPU's kernels cannot be made batch-invariant: {kernels.note}")


def ways(model: RewardModel) -> dict[str, list[float]]:
    """The same items scored every way the engine may plan them."""
    order = list(range(len(ITEMS)))
    rng.shuffle(order)
    shuffled = score_offline(model, [ITEMS[i] for i in order])
    return {
        "alone": [score_offline(model, [x])[0] for x in ITEMS],
        "one plan": score_offline(model, ITEMS),
        "reversed": score_offline(model, ITEMS[::-1])[::-1],
        "shuffled": [shuffled[order.index(i)] for i in range(len(ITEMS))],
        "plans of 3": score_offline(model, ITEMS, max_batch_size=3),
        "budget of 2 long items": score_offline(model, ITEMS, max_batch_tokens=512),
    }


def plans_case(name: str, dtype: str) -> Any:
    """Every decoder in float32; in bfloat16 a Llama and a GPT-2 in the fast lane, the rest in the slow lane."""
    slow = dtype == "bfloat16" and name not in ("llama", "gpt2")
    return pytest.param(name, dtype, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{dtype}")


@pytest.mark.parametrize("fixed_rows", [0, 64], ids=["measured", "fixed-64"])
@pytest.mark.parametrize(("name", "dtype"), [plans_case(n, d) for d in ("float32", "bfloat16") for n in DECODERS])
def test_every_plan_gives_the_rewards_alone_bitwise(
    checkpoints: dict[str, Path], name: str, dtype: str, fixed_rows: int
) -> None:
    model = load_reward_model(checkpoints[name], dtype=dtype, device="cpu")
    kernels = model.prepare(fixed_rows=fixed_rows)
    if_kernels_allow(kernels)
    assert kernels.layout == "packed" and kernels.batch_invariant and kernels.attention_calls > 0, kernels
    got = ways(model)
    assert len(set(got["alone"])) == len(ITEMS)  # distinct rewards: equality below is not a coincidence
    for way, rewards in got.items():
        assert rewards == got["alone"], (name, dtype, way)


@pytest.mark.parametrize("name", [*DECODERS, "bert"])
def test_rewards_equal_a_direct_forward(name: str, load: Callable[..., RewardModel]) -> None:
    model = load(name)
    want = direct(model, ITEMS)
    assert max(abs(a) for a in want) > 0.05  # rewards of a size where the tolerance means something
    got = score_offline(model, ITEMS)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL, name


def test_encoders_run_padded_and_padding_does_not_move_a_reward(load: Callable[..., RewardModel]) -> None:
    model = load("bert")
    assert not model.packs and model.prepared.layout == "padded" and "SDPA decoder" in model.prepared.note
    alone = [score_offline(model, [x])[0] for x in ITEMS]
    for rewards in (score_offline(model, ITEMS), score_offline(model, ITEMS[::-1])[::-1]):
        assert max(abs(a - b) for a, b in zip(rewards, alone, strict=True)) <= 1e-5


def test_a_prompt_is_computed_once_per_plan(load: Callable[..., RewardModel]) -> None:
    model = load("llama")
    encoded = model.encoder.encode_batch(ITEMS)
    plan = plan_of(encoded, packed=True)
    assert len(plan.prompts) == len(PROMPTS) + 1  # each prompt once, the lone item's too
    saved = sum(4 * e.prefix for e in encoded[0:15:5])  # groups of 5: four copies of each prompt
    assert sum(len(e) for e in encoded) - plan.cost == saved > 0


def test_a_token_merging_prompt_and_reply_is_not_shared(load: Callable[..., RewardModel]) -> None:
    """Tokenized alone, a prompt can end in a token the whole sequence does not have ("qu" "i" vs "qu" "ick"): only
    the tokens identical in the whole sequence count as the prompt, so such items still score exactly."""
    model = load("llama")
    tokens = model.encoder.tokenizer.convert_ids_to_tokens
    items = [Formatted("the quick " + words(n), prompt="the qui") for n in (3, 9)]
    encoded = model.encoder.encode_batch(items)
    assert [tokens(e.input_ids[: e.prefix]) for e in encoded] == [["t", "he", "Ġqu"]] * 2  # not "i", not "ick"
    assert max(abs(a - b) for a, b in zip(model.score(encoded), direct(model, items), strict=True)) <= TOL


def test_truncated_items_share_only_what_survives(load: Callable[..., RewardModel]) -> None:
    model = load("llama", max_length=48)
    long_prompt = words(200)
    inputs = [ScoringInput(long_prompt, "yes"), ScoringInput(long_prompt, words(6))]
    short, long = model.encoder.encode_batch(inputs)
    assert short.truncated and long.truncated
    assert 0 < long.prefix < short.prefix < 48
    got = model.score([short, long])
    assert max(abs(a - b) for a, b in zip(got, direct(model, inputs), strict=True)) <= TOL


def test_raw_queries_share_a_templated_prompt_they_start_with(load: Callable[..., RewardModel]) -> None:
    model = load("llama")
    prompt = "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n"
    raw = [Formatted(prompt + reply, prompt=prompt) for reply in ("In France.", "No idea, sorry.")]
    encoded = model.encoder.encode_batch(raw)
    assert encoded[0].prefix > 0 and len(plan_of(encoded, packed=True).prompts) == 1
    assert model.encoder.encode(Formatted(prompt + "x")).prefix == 0  # no prompt given
    assert max(abs(a - b) for a, b in zip(model.score(encoded), direct(model, raw), strict=True)) <= TOL


def test_a_backbone_that_hides_the_spans_from_attention_runs_padded(checkpoints: dict[str, Path]) -> None:
    """Packed items would attend to each other if the spans never reached attention: the probe sees it."""
    model = load_reward_model(checkpoints["llama"], dtype="float32", device="cpu")
    forward = model.module.backbone.forward
    model.module.backbone.forward = lambda *a, reward_spans=None, **kw: forward(*a, **kw)  # type: ignore[method-assign]
    kernels = model.prepare()
    assert kernels.layout == "padded" and not kernels.batch_invariant and "attention" in kernels.note
    got = score_offline(model, ITEMS)
    assert max(abs(a - b) for a, b in zip(got, direct(model, ITEMS), strict=True)) <= 1e-5


def test_the_sweep_finds_the_row_count_from_which_rows_stop_moving(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(32, 48)
    real = torch.mm

    def by_row(x: torch.Tensor, w: torch.Tensor, **kw: Any) -> torch.Tensor:  # a kernel whose rows never move
        return torch.cat([real(row[None], w) for row in x])

    monkeypatch.setattr(invariant.torch, "mm", by_row)
    assert invariant.sweep(weight) == 1

    def moving(x: torch.Tensor, w: torch.Tensor, **kw: Any) -> torch.Tensor:  # a kernel whose rows move below 40
        out = by_row(x, w)
        return out + 1e-3 if x.shape[0] < 40 else out

    monkeypatch.setattr(invariant.torch, "mm", moving)
    assert invariant.sweep(weight) == 40  # counts 1-64 are swept densely
    linear = invariant.BlockedLinear(32, 8)
    shapes = invariant.choose(torch.nn.Sequential(linear), "cpu")
    assert linear.blocking == invariant.Blocking(40, 16, invariant.SWEEP_ROWS)
    assert shapes == ({"32x8 float32": "one call of 40-512 rows, padded to a multiple of 16"}, [])
    monkeypatch.setattr(invariant.torch, "mm", lambda x, w, **kw: by_row(x, w) + (x.shape[0] < 512))
    assert invariant.choose(torch.nn.Sequential(linear), "cpu")[1] == []
    assert linear.blocking == invariant.Blocking(512, 512, 512)  # no count below the fixed block: fixed blocks

    def by_place(x: torch.Tensor, w: torch.Tensor, **kw: Any) -> torch.Tensor:  # the call's last row is computed apart
        out = by_row(x, w)
        out[-1] += 1e-3
        return out

    monkeypatch.setattr(invariant.torch, "mm", by_place)
    assert not invariant.rows_stay_put(weight, 64)
    assert invariant.choose(torch.nn.Sequential(linear), "cpu", fixed_rows=64)[1] == ["32x8 float32"]


def test_a_device_whose_rows_move_in_any_call_gets_stock_kernels_and_says_why(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_reward_model(checkpoints["llama"], dtype="float32", device="cpu")
    monkeypatch.setattr(invariant, "rows_stay_put", lambda weight, rows: weight.shape[1] != 64)  # the MLP's up/gate
    kernels = model.prepare(fixed_rows=64)
    assert kernels.layout == "packed" and not kernels.batch_invariant and model.kernels == kernels  # /info's too
    assert "32x64 float32" in kernels.note and "move with their place" in kernels.note


def test_blocked_calls_compute_the_product() -> None:
    x, w = torch.randn(1100, 24, dtype=torch.float64), torch.randn(24, 8, dtype=torch.float64)
    for blocking in (invariant.Blocking(1, 16, 512), invariant.Blocking(64, 64, 64), invariant.Blocking(48, 16, 512)):
        assert torch.allclose(invariant.blocked_mm(x, w, blocking), x @ w)
    assert [invariant.Blocking(1, 16, 512).rows(n) for n in (1, 16, 17)] == [16, 16, 32]  # a lone item: few rows
    assert invariant.Blocking(48, 16, 512).rows(5) == 48


@pytest.mark.slow  # the shipped 135M-parameter model
def test_the_default_model_in_bf16_is_invariant_where_the_stock_kernels_are_not() -> None:
    """On the shipped model the stock bf16 kernels move a reward with its batch (the failure this guards against);
    the invariant kernels do not, with the calls the probe chose and with fixed blocks."""
    model = load_reward_model(Path("models/default"), dtype="bfloat16", device="cpu")
    items = model.encoder.encode_batch(ITEMS[::3])
    assert model.stock(items) != [model.stock([x])[0] for x in items]  # moved by the padded batch
    for fixed in (0, 512):
        model.prepare(fixed_rows=fixed)
        alone = [model.score([x])[0] for x in items]
        assert model.score(items) == alone and model.score(items[::-1])[::-1] == alone


async def test_concurrent_requests_get_the_rewards_alone_bitwise(
    make_client: Any, load: Callable[..., RewardModel]
) -> None:
    """Through the server: items sent one per request, concurrently (they land in plans with strangers), equal
    each item scored alone, and one request with all of them."""

    def body(items: list[ScoringInput]) -> dict[str, Any]:
        return {"items": [{"prompt": x.prompt, "response": x.response} for x in items]}

    async with make_client("value_head", max_batch_size=64) as client:
        worker = client.app.state.workers[0]
        info = (await client.get("/info")).json()
        if_kernels_allow(Kernels(**info["kernels"]))
        assert info["kernels"]["batch_invariant"] and info["kernels"]["layout"] == "packed"
        alone = [(await client.post("/score", json=body([x]))).json()["rewards"][0] for x in ITEMS]
        before = worker.stats.batches
        single = await asyncio.gather(*(client.post("/score", json=body([x])) for x in ITEMS))
        assert worker.stats.batches - before < len(ITEMS)  # they were planned together
        together = (await client.post("/score", json=body(ITEMS))).json()["rewards"]
    assert [r.json()["rewards"][0] for r in single] == alone == together


def test_the_fingerprint_names_the_kernels(checkpoints: dict[str, Path]) -> None:
    model = load_reward_model(checkpoints["llama"], dtype="float32", device="cpu")
    if_kernels_allow(model.prepare())
    measured = served_fingerprint(model)
    assert served_fingerprint(model) == measured
    model.prepare(fixed_rows=128)
    assert served_fingerprint(model) != measured
    model.prepare(batch_invariant=False)
    assert served_fingerprint(model) != measured
    assert served_fingerprint(model, {"mean": 0.0, "std": 2.0}) != served_fingerprint(model)


@pytest.mark.parametrize("name", ["llama", "gpt2", "value_head"])
def test_left_padding_reads_the_same_token(name: str, load: Callable[..., RewardModel]) -> None:
    """Callers that pad on the left (HF decoders often do) get the same rewards: positions come from the mask."""
    model = load(name)
    encoded = model.encoder.encode_batch(ITEMS)
    right = model.stock(encoded)
    width = max(len(e) for e in encoded) + 3
    ids = torch.full((len(encoded), width), model.pad_id)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e.input_ids)
        mask[row, width - len(e) :] = 1
    assert (last_real_index(mask) == width - 1).all()
    with torch.inference_mode():
        left = model.module(ids, mask)[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(left, right, strict=True)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(right, direct(model, ITEMS), strict=True)) <= 1e-5


def test_tokenizer_padding_side_does_not_matter(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(checkpoints["llama"], tmp_path / "left")
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["padding_side"] = "left"
    config_file.write_text(json.dumps(config))
    left = load_reward_model(copy, dtype="float32", device="cpu")
    right = load_reward_model(checkpoints["llama"], dtype="float32", device="cpu")
    assert left.encoder.tokenizer.padding_side == "left"
    assert left.score(left.encoder.encode_batch(ITEMS)) == right.score(right.encoder.encode_batch(ITEMS))


def test_pad_equal_to_eos_still_reads_the_eos(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """HF's own pooling skips a trailing EOS when pad == eos (transformers #35352); ours reads it."""
    copy = shutil.copytree(checkpoints["value_head"], tmp_path / "pad_eos")
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = config["eos_token"]
    config_file.write_text(json.dumps(config))
    model = load_reward_model(copy, dtype="float32", device="cpu")
    assert model.pad_id == model.encoder.eos_id
    encoded = model.encoder.encode_batch(ITEMS)
    assert all(e.input_ids[-1] == model.encoder.eos_id for e in encoded)
    assert max(abs(x - y) for x, y in zip(model.score(encoded), direct(model, ITEMS), strict=True)) <= TOL
