"""verl against a running reward server. verl has no setting for an external reward model, so two ways in:

- a custom reward function, called once per sample:
  `reward.custom_reward_function.path=pkg://app.clients.verl reward.custom_reward_function.name=compute_score
  +reward.custom_reward_function.reward_kwargs.url=http://rm:8000`; the prompt comes from what the dataset put in
  `extra_info` (`raw_prompt` messages on the agent-loop path, else `extra_info[prompt_key]`);
- a reward manager for verl's reward loop, which reads the sample's own prompt messages (`raw_prompt`):
  `reward.reward_manager.source=importlib reward.reward_manager.module.path=pkg://app.clients.verl
  reward.reward_manager.name=ServerRewardManager +reward.reward_kwargs.url=http://rm:8000` (verl's DAPO manager
  reads `reward.reward_kwargs` the same way).

Both send the conversation (the prompt messages and the decoded reply, the policy's special tokens skipped) to
`/score`, so the reward model's own template and EOS are applied: never the policy's rendering. Both return the same
keys for every sample (verl builds its extra-info table from the first sample's keys). A failure raises: verl stops
the step rather than train on a reward that is not there.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from typing import Any

from app.clients.client import AsyncRewardClient
from app.clients.results import ItemScore

DEFAULT_TIMEOUT_S = 180.0
Key = tuple[str, str | None, float, str | None, str | None]
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Key, AsyncRewardClient]]
_clients = weakref.WeakKeyDictionary()


def _client(url: str, api_key: str | None, timeout_s: float, model: str | None, run: str | None) -> AsyncRewardClient:
    """One connection pool per event loop, server, model and run, made on first use (verl may call from several
    loops)."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    key = (url, api_key, timeout_s, model, run)
    if key not in per_loop:
        per_loop[key] = AsyncRewardClient(url, api_key=api_key, timeout=timeout_s, model=model, run=run)
    return per_loop[key]


def conversation(prompt: Any, reply: str) -> dict[str, Any]:
    """A /score item: prompt messages (a list, or verl's numpy object array of dicts) or prompt text, then the
    reply as the assistant's turn."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "response": reply}
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(prompt)]
    if messages and messages[-1]["role"] == "assistant":
        raise ValueError("the prompt already ends with an assistant turn; the reply to score must come last")
    return {"messages": [*messages, {"role": "assistant", "content": reply}]}


def _fields(result: ItemScore, warnings: int = 0) -> dict[str, float]:
    """What verl logs per sample: the monitor's warnings in force for the run; an ensemble adds its spread and each
    member's reward."""
    fields = {
        "score": result.reward,
        "reward_num_tokens": float(result.num_tokens),
        "reward_truncated": float(result.truncated),
        "reward_monitor_warnings": float(warnings),
    }
    if result.std is not None:
        fields["reward_std"] = result.std
    fields.update({f"reward_member_{name}": r for name, r in (result.members or {}).items()})
    return fields


async def _score(
    item: dict[str, Any], url: str, api_key: str | None, timeout_s: float, model: str | None, run: str | None
) -> dict[str, float]:
    result = await _client(url, api_key, timeout_s, model, run).score([item])
    return _fields(result.items[0], len(result.warnings))


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    url: str,
    api_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prompt_key: str = "question",
    model: str | None = None,
    run: str | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's custom reward function: `{"score": reward, "reward_num_tokens", "reward_truncated"}` for one sample
    (an ensemble's `model` adds `reward_std` and `reward_member_<name>`). `data_source`, `ground_truth` and verl's
    other keyword arguments are accepted and unused."""
    info = extra_info or {}
    prompt = info.get("raw_prompt")
    if prompt is None:
        prompt = info.get(prompt_key)
    if prompt is None:
        raise ValueError(
            f"extra_info has neither 'raw_prompt' nor {prompt_key!r}: put the prompt in the dataset's extra_info, "
            "or name its key with +reward.custom_reward_function.reward_kwargs.prompt_key=..."
        )
    return await _score(conversation(prompt, solution_str), url, api_key, timeout_s, model, run)


class ServerRewardManager:
    """verl's reward-loop manager: each sample's `raw_prompt` messages plus its decoded reply, scored by the server.

    Options from `reward.reward_kwargs` (`url`, `api_key`, `timeout_s`, `model`, `run`: by default the trainer's
    `trainer.experiment_name`, which the server's monitor keeps apart). Built by verl as
    `(config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None)`. It has the
    interface of verl's `RewardManagerBase` without subclassing it, so this module imports no torch (verl's tensors
    come in through `data`)."""

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        compute_score: Any = None,
        reward_router_address: str | None = None,
        reward_model_tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.config, self.tokenizer = config, tokenizer
        options = dict(config.reward.get("reward_kwargs") or {})
        if not options.get("url"):
            raise ValueError("set the reward server's URL: +reward.reward_kwargs.url=http://host:8000")
        self.url = str(options["url"])
        self.api_key = options.get("api_key")
        self.timeout_s = float(options.get("timeout_s", DEFAULT_TIMEOUT_S))
        self.model: str | None = options.get("model")
        trainer = config.get("trainer") or {}
        self.run: str | None = options.get("run") or trainer.get("experiment_name")

    async def run_single(self, data: Any) -> dict[str, Any]:
        item = data[-1:][0]  # as verl's own managers: several sequences of one sample score the last one
        responses = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-responses.shape[-1] :].sum())
        reply = self.tokenizer.decode(responses[:valid], skip_special_tokens=True)
        prompt = item.non_tensor_batch.get("raw_prompt")
        if prompt is None:
            raise ValueError("the batch has no raw_prompt: set data.return_raw_chat=True")
        item = conversation(prompt, reply)
        fields = await _score(item, self.url, self.api_key, self.timeout_s, self.model, self.run)
        score = fields.pop("score")
        return {"reward_score": score, "reward_extra_info": {"score": score, **fields}}

    @classmethod
    def assemble_rm_scores(cls, data: Any, scores: list[float]) -> Any:
        """The batch's `rm_scores` as verl's base class builds them: each score on its last response token."""
        prompt_length = data.batch["prompts"].size(1)
        lengths = data.batch["attention_mask"][:, prompt_length:].sum(dim=1).tolist()
        rm_scores = data.batch["responses"].new_zeros(data.batch["responses"].shape).float()
        for row, (length, value) in enumerate(zip(lengths, scores, strict=True)):
            rm_scores[row, length - 1] = value
        return rm_scores
