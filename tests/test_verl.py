"""verl against the live server, called the way verl 0.9 calls: its custom-reward-function loader and call, its
reward-loop manager loader and `run_single`, and its own discriminative-RM request (`RewardLoopWorker`). Each
reward must equal /score of the conversation. The verl-side tests skip where verl is not installed (.ci/install
installs it with --no-deps: its reward code imports without a GPU)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch

from app.clients import verl as adapter
from tests import tiny

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Paris?"}]
REPLIES = ["In France.", "It is in Texas, I believe, though there is another one somewhere."]
KEYS = {"score", "reward_num_tokens", "reward_truncated", "reward_monitor_warnings"}


def score(url: str, items: list[dict[str, Any]]) -> list[float]:
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/score", json={"items": items})
    assert r.status_code == 200, r.text
    return list(r.json()["rewards"])


def conversations(replies: list[str] = REPLIES) -> list[dict[str, Any]]:
    return [{"messages": [*MESSAGES, {"role": "assistant", "content": x}]} for x in replies]


def verl_modules() -> Any:
    return pytest.importorskip("verl.trainer.ppo.reward", reason="verl is not installed (.ci/install adds it)")


def test_compute_score_takes_the_prompt_from_extra_info(live_server: str) -> None:
    want = score(live_server, conversations())
    question = score(live_server, [{"prompt": MESSAGES[1]["content"], "response": x} for x in REPLIES])

    async def run() -> list[dict[str, float]]:
        raw = np.array(MESSAGES, dtype=object)  # verl's agent loop: the messages as a numpy object array
        calls = [
            adapter.compute_score("src", x, "gt", {"raw_prompt": raw, "index": 0}, url=live_server) for x in REPLIES
        ]
        calls += [
            adapter.compute_score("src", x, "gt", {"question": MESSAGES[1]["content"]}, url=live_server)
            for x in REPLIES
        ]
        return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert all(set(r) == KEYS for r in results)  # the same keys for every sample
    assert [r["score"] for r in results] == pytest.approx(want + question, abs=1e-6)
    with pytest.raises(ValueError, match="prompt_key"):
        asyncio.run(adapter.compute_score("src", "x", "gt", {"answer": 1}, url=live_server))


def test_compute_score_loaded_and_called_as_verl_does(live_server: str) -> None:
    """verl's `get_custom_reward_fn` merges the reward_kwargs; `NaiveRewardManager.run_single` awaits the
    function with keyword arguments, decoded reply in `solution_str`."""
    reward = verl_modules()
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://app.clients.verl",
                    "name": "compute_score",
                    "reward_kwargs": {"url": live_server, "timeout_s": 30},
                }
            }
        }
    )
    fn = reward.get_custom_reward_fn(config)
    result = asyncio.run(
        fn(data_source="x", solution_str=REPLIES[0], ground_truth="y", extra_info={"raw_prompt": MESSAGES})
    )
    assert result["score"] == pytest.approx(score(live_server, conversations())[0], abs=1e-6)


def verl_sample(tokenizer: Any, reply: str, prompt_width: int = 12, response_width: int = 96) -> Any:
    """One sample as verl's rollout leaves it: left-padded prompt ids, right-padded response ids (reply + EOS),
    the attention mask over both, the raw prompt messages in `non_tensor_batch`."""
    from verl import DataProto

    pad = tokenizer.pad_token_id
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)[-prompt_width:]
    response = (tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:response_width]
    ids = torch.full((1, prompt_width + response_width), pad)
    mask = torch.zeros_like(ids)
    ids[0, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt)
    ids[0, prompt_width : prompt_width + len(response)] = torch.tensor(response)
    mask[0, prompt_width - len(prompt) : prompt_width + len(response)] = 1
    return DataProto.from_dict(
        tensors={
            "prompts": ids[:, :prompt_width],
            "responses": ids[:, prompt_width:],
            "input_ids": ids,
            "attention_mask": mask,
        },
        non_tensors={"raw_prompt": np.array([MESSAGES], dtype=object), "data_source": np.array(["x"], dtype=object)},
    )


def test_the_reward_manager_loaded_and_run_as_verls_reward_loop_does(live_server: str) -> None:
    """`load_reward_manager` resolves it by importlib and builds it with verl's arguments; the reward loop awaits
    `run_single` per sample and `assemble_rm_scores` puts each score on its last response token."""
    reward = verl_modules()
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {"path": None},
                "reward_manager": {
                    "source": "importlib",
                    "name": "ServerRewardManager",
                    "module": {"path": "pkg://app.clients.verl"},
                },
                "reward_kwargs": {"url": live_server, "timeout_s": 30},
                "sandbox_fusion": None,
            }
        }
    )
    policy = tiny.byte_level_tokenizer(bos=False, chat=True)
    manager = reward.load_reward_manager(config, policy, reward_router_address=None, reward_model_tokenizer=None)
    assert isinstance(manager, adapter.ServerRewardManager)
    samples = [verl_sample(policy, x) for x in REPLIES]

    async def run() -> list[dict[str, Any]]:
        return await asyncio.gather(*(manager.run_single(s) for s in samples))

    outputs = asyncio.run(run())
    decoded = [policy.decode(policy(x, add_special_tokens=False)["input_ids"]) for x in REPLIES]
    want = score(live_server, conversations(decoded))
    assert [o["reward_score"] for o in outputs] == pytest.approx(want, abs=1e-6)
    assert all(set(o["reward_extra_info"]) == KEYS for o in outputs)
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    batch = DataProto.concat(samples)
    scores = [o["reward_score"] for o in outputs]
    rm_scores = adapter.ServerRewardManager.assemble_rm_scores(batch, scores)
    assert torch.equal(rm_scores, RewardManagerBase.assemble_rm_scores(batch, scores))  # verl's own placement
    lengths = batch.batch["attention_mask"][:, 12:].sum(1)
    assert rm_scores[torch.arange(2), lengths - 1].tolist() == pytest.approx(want, abs=1e-6)


def test_verls_own_discriminative_request(live_server: str) -> None:
    """verl's `RewardLoopWorker.compute_score_disrm` (vLLM engine): the RM's template rendering, BOS stripped,
    `POST /classify` with `use_activation: false`, `data[-1].probs[-1]`: equal to /score of the conversation."""
    pytest.importorskip("verl.experimental.reward_loop.reward_loop", reason="verl is not installed")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    info = httpx.get(f"{live_server}/info", timeout=30).json()
    reward_tokenizer = AutoTokenizer.from_pretrained(info["model_path"])
    policy = tiny.byte_level_tokenizer(bos=False, chat=True)
    worker = RewardLoopWorker.__new__(RewardLoopWorker)  # its __init__ loads tokenizers by config path and Ray
    worker.config = OmegaConf.create(
        {"reward": {"reward_model": {"rollout": {"name": "vllm"}, "model_path": info["model_path"]}}}
    )
    worker.reward_router_address = urlsplit(live_server).netloc
    worker.input_tokenizer, worker.reward_model_tokenizer = policy, reward_tokenizer

    async def run() -> list[dict[str, Any]]:
        return [await worker.compute_score_disrm(verl_sample(policy, x)) for x in REPLIES]

    outputs = asyncio.run(run())
    decoded = [policy.decode(policy(x, add_special_tokens=False)["input_ids"]) for x in REPLIES]
    assert [o["reward_score"] for o in outputs] == pytest.approx(score(live_server, conversations(decoded)), abs=1e-5)
