"""/get_reward reads an OpenRLHF query (the policy's chat template, its EOS, special tokens kept) back into the
conversation it encodes and scores that with the reward model's own recipe, equal to /score of the conversation."""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.model.conversations import KNOWN_FORMATS, Message, chat_formats, own_format, read_query
from app.model.recipe import Formatted
from tests import tiny
from tests.conftest import test_settings

SYSTEM, USER, REPLY = "You are a careful assistant.", "Where is Paris?", "In France, on the Seine."
ZEPHYR = (  # a template none of the known formats is: read through the checkpoint's own
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreTrainedTokenizerBase]:
    root = tmp_path_factory.mktemp("policies")
    return {f: AutoTokenizer.from_pretrained(tiny.build_family(root / f, f)) for f in ("llama3", "gemma", "chatml")}


def openrlhf_query(policy: PreTrainedTokenizerBase, messages: list[dict[str, str]], reply: str) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF 0.11 builds them: the policy's templated prompt, its token ids plus the reply's
    and the policy's EOS, decoded with special tokens kept (`SingleTurnAgentExecutor.execute`)."""
    prompt = policy.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = policy(prompt, add_special_tokens=False)["input_ids"]
    ids += policy(reply, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
    return policy.decode(ids, skip_special_tokens=False), prompt


def conversation(policy: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The messages a policy is given, and the conversation its rendering encodes (Qwen's template adds a system
    prompt; Gemma's has no system role)."""
    if policy == "chatml":
        given = [{"role": "user", "content": USER}]
        return given, [{"role": "system", "content": "You are a helpful assistant."}, *given]
    given = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    return (given[1:], given[1:]) if policy == "gemma" else (given, given)


async def conversation_reward(client: httpx.AsyncClient, messages: list[dict[str, str]], reply: str) -> float:
    item = {"messages": [*messages, {"role": "assistant", "content": reply}]}
    r = await client.post("/score", json={"items": [item]})
    assert r.status_code == 200, r.text
    return float(r.json()["rewards"][0])


@pytest.mark.parametrize("policy", ["chatml", "llama3", "gemma"])
async def test_a_policys_query_scores_as_its_conversation(
    policy: str, policies: dict[str, PreTrainedTokenizerBase], make_client: Any
) -> None:
    """The reward model here renders ChatML; each policy's own rendering is read back, not scored raw."""
    given, encoded = conversation(policy)
    query, prompt = openrlhf_query(policies[policy], given, REPLY)
    async with make_client("llama") as client:
        r = await client.post("/get_reward", json={"query": [query], "prompts": [prompt], "labels": [None]})
        want = await conversation_reward(client, encoded, REPLY)
        raw = await client.post("/score", json={"items": [{"prompt": "", "response": query}]})
    body = r.json()
    assert r.status_code == 200, r.text
    assert body["read_as"] == [policy] and body["extra_logs"][f"reward_read_as_{policy}"] == [1.0]
    assert body["rewards"][0] == pytest.approx(want, abs=1e-6)
    assert body["rewards"][0] != pytest.approx(raw.json()["rewards"][0], abs=1e-4)  # the raw reading differs


async def test_a_mistral_query_scores_as_its_conversation(make_client: Any) -> None:
    query = f"<s>[INST] {USER} [/INST] {REPLY}</s>"
    async with make_client("llama") as client:
        r = await client.post("/get_reward", json={"query": [query], "prompts": [f"<s>[INST] {USER} [/INST]"]})
        want = await conversation_reward(client, [{"role": "user", "content": USER}], REPLY)
    assert r.json()["read_as"] == ["mistral"] and r.json()["rewards"][0] == pytest.approx(want, abs=1e-6)


async def test_text_in_no_template_is_scored_as_the_sequence_it_is(
    make_client: Any, load: Any, checkpoints: dict[str, Path]
) -> None:
    query = "<|im_start|>user\nunterminated <|im_start|>weird"
    model = load("llama")
    settings = test_settings(checkpoints["llama"])
    model.prepare(settings.batch_invariant, settings.block_rows)  # the server's kernels
    [want] = model.score([model.encoder.encode(Formatted(query))])
    async with make_client("llama") as client:
        r = await client.post("/get_reward", json={"query": [query]})
    assert r.json()["read_as"] == ["raw"] and r.json()["rewards"][0] == pytest.approx(want, abs=1e-6)


def test_reading_strips_the_policys_end_and_padding_only() -> None:
    chatml = KNOWN_FORMATS[0]
    body = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n{REPLY}\n"
    want = [Message(role="user", content=USER), Message(role="assistant", content=REPLY + "\n")]
    for ending in ("", "<|im_end|>", "<|im_end|>\n<|endoftext|><|endoftext|>", "<|im_end|><pad>"):
        assert chatml.read(body + ending, pads=("<pad>",)) == want, ending
    assert chatml.read("<pad><pad>" + body, pads=("<pad>",)) == want  # left padding
    assert chatml.read(f"<|im_start|>user\n{USER}<|im_end|>\n") is None  # no reply to score
    assert read_query(f"Human: {USER}\n\nAssistant: {REPLY}", KNOWN_FORMATS) is None


def test_the_checkpoints_own_template_is_read_back() -> None:
    tokenizer = tiny.byte_level_tokenizer(bos=False, chat=True)
    tokenizer.chat_template = ZEPHYR
    own = own_format(tokenizer)
    assert own is not None and own.turns["user"] == ("<|user|>\n", "<|im_end|>")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": REPLY}], tokenize=False)
    assert read_query(text, KNOWN_FORMATS) is None
    assert read_query(text, [own]) == ("checkpoint", [*messages, {"role": "assistant", "content": REPLY}])
    plain = tiny.byte_level_tokenizer(bos=False, chat=False)
    assert own_format(plain) is None


def test_a_chatml_query_over_a_live_server(live_server: str) -> None:
    """The issue's case: the policy's system prompt is part of what the reward model reads."""
    query = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    with httpx.Client(base_url=live_server, timeout=30) as client:
        r = client.post("/get_reward", json={"query": [query + REPLY + "<|im_end|>"], "prompts": [query]})
        item = {"messages": [*messages, {"role": "assistant", "content": REPLY}]}
        want = client.post("/score", json={"items": [item]}).json()["rewards"][0]
    assert r.json()["read_as"] == ["chatml"] and r.json()["rewards"][0] == pytest.approx(want, abs=1e-6)


def openrlhf_agent_module() -> types.ModuleType:
    """OpenRLHF's own `openrlhf/utils/agent.py`, loaded from the installed wheel without its package `__init__`
    (which imports DeepSpeed); skips when OpenRLHF is not installed."""
    try:
        dist = importlib.metadata.distribution("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("OpenRLHF is not installed (.ci/install installs it with --no-deps)")
    root = Path(str(dist.locate_file("openrlhf")))
    for name in ("openrlhf", "openrlhf.utils"):
        package = types.ModuleType(name)
        package.__path__ = [str(root / name.replace("openrlhf", "", 1).strip(".").replace(".", "/"))]
        sys.modules.setdefault(name, package)
    modules = {}
    for name in ("logging_utils", "agent"):
        spec = importlib.util.spec_from_file_location(f"openrlhf.utils.{name}", root / "utils" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules["agent"]


def test_openrlhfs_own_reward_fetcher(live_server: str, policies: dict[str, PreTrainedTokenizerBase]) -> None:
    """`SingleTurnAgentExecutor._fetch_rewards_via_http`, OpenRLHF 0.11's code, against the live server."""
    agent = openrlhf_agent_module()
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=[f"{live_server}/get_reward"])
    given, encoded = conversation("llama3")
    query, prompt = openrlhf_query(policies["llama3"], given, REPLY)
    [info] = asyncio.run(executor._fetch_rewards_via_http([query], [prompt], ["label"]))
    with httpx.Client(base_url=live_server, timeout=30) as client:
        item = {"messages": [*encoded, {"role": "assistant", "content": REPLY}]}
        want = client.post("/score", json={"items": [item]}).json()["rewards"][0]
    assert info["rewards"] == [pytest.approx(want, abs=1e-6)] and info["scores"] == info["rewards"]
    assert info["extra_logs"]["reward_read_as_llama3"] == [1.0]


LLAMA31 = (  # Llama-3.1's shape: a system turn always written, a preamble before the system prompt's text
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n' }}"
    "{{ sys + '<|eot_id|>' }}{% for m in rest %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("with_system", [True, False])
def test_the_checkpoints_own_template_goes_first_when_it_is_not_a_known_one(
    with_system: bool, policies: dict[str, PreTrainedTokenizerBase]
) -> None:
    """Read with the generic Llama-3 format, a Llama-3.1 query's system text would carry the template's preamble and
    get it twice when re-rendered; the checkpoint's own format reads it back to the conversation that renders it."""
    tokenizer = copy.deepcopy(policies["llama3"])
    tokenizer.chat_template = LLAMA31
    formats = chat_formats(tokenizer)
    assert [f.name for f in formats] == ["checkpoint", *(f.name for f in KNOWN_FORMATS)]
    given = [{"role": "system", "content": SYSTEM}] if with_system else []
    given.append({"role": "user", "content": USER})
    query, _ = openrlhf_query(tokenizer, given, REPLY)
    name, messages = read_query(query, formats) or ("", [])
    assert name == "checkpoint"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == query  # the conversation read back renders the query itself (its EOS closes the turn)
    assert chat_formats(tiny.byte_level_tokenizer(bos=False, chat=True)) == KNOWN_FORMATS  # ChatML: a known one


def test_a_bos_that_opens_every_turn_stays_in_the_headers(policies: dict[str, PreTrainedTokenizerBase]) -> None:
    """SmolLM2 names ChatML's `<|im_start|>` its bos_token: the derived format keeps it in every header (it is not a
    leading token to strip), so it equals ChatML and the query reads as `chatml`."""
    tokenizer = copy.deepcopy(policies["chatml"])
    tokenizer.bos_token = "<|im_start|>"
    own = own_format(tokenizer)
    assert own is not None and own.turns["system"] == ("<|im_start|>system\n", "<|im_end|>")
    assert chat_formats(tokenizer) == KNOWN_FORMATS
