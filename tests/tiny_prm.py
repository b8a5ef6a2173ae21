"""Tiny hand-built replicas of the three process-reward families, and each card's own reading of them with plain
transformers (the independent references `tests/test_prm.py` checks the server against)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
)

from tests.tiny import CHATML, CORPUS, SPECIALS, _byte_bpe, byte_level_tokenizer, llama_config, small_config

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
MATH = [
    "Janet has 3 apples + 2 more - 1 eaten. How many are left?",
    "Step 1: 3 + 2 = 5 apples in all.",
    "Step 2: 5 - 1 = 4 apples left.",
] * 6


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's way: ChatML, no BOS, `<extra_0>` a special token of the vocabulary."""
    tok = _byte_bpe([*SPECIALS, "<extra_0>"], None)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    out.chat_template = CHATML
    return out


class QwenProcessReward(nn.Module):
    """Qwen2ForProcessRewardModel as its remote code defines it: `model` and `score` (Linear, ReLU, Linear(h, 2))."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.score(self.model(input_ids=input_ids).last_hidden_state)


def build_qwen_prm(path: Path) -> Path:
    torch.manual_seed(11)
    tokenizer = qwen_tokenizer()
    config = small_config(Qwen2Config, tokenizer)
    model = QwenProcessReward(config)
    with torch.no_grad():
        model.score[2].weight.normal_(0, 1.0)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.auto_map = {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}  # remote code we never run
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def qwen_reference(path: Path, query: str, steps: Sequence[str]) -> list[float]:
    """The card's code: the chat with its system prompt, `<extra_0>` after each step, softmax class 1 there."""
    config = Qwen2Config.from_pretrained(path)
    model = QwenProcessReward(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    tokenizer = AutoTokenizer.from_pretrained(path)  # as the card loads it
    messages = [
        {"role": "system", "content": QWEN_SYSTEM},
        {"role": "user", "content": query},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tokenizer.encode(text, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(ids)
    mask = ids == tokenizer.encode("<extra_0>")[0]
    return torch.softmax(logits.float(), dim=-1)[mask][:, 1].tolist()


def shepherd_tokenizer() -> PreTrainedTokenizerFast:
    """Llama/Mistral-like (BOS added), `ки` a plain added token, `+` and ` -` tokens of their own."""
    tok = _byte_bpe(SPECIALS, "<|im_start|>", CORPUS + MATH, vocab_size=420)
    tok.add_tokens([AddedToken("ки", normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )


def build_shepherd(path: Path) -> Path:
    """A causal LM read at its `ки` tags by the logits of `+` and `-` (math-shepherd-mistral-7b-prm's way)."""
    torch.manual_seed(12)
    tokenizer = shepherd_tokenizer()
    model = MistralForCausalLM(small_config(MistralConfig, tokenizer, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def shepherd_reference(path: Path, question: str, steps: Sequence[str]) -> list[float]:
    """The card's code: `{question} {output}`, each step ending ` ки`, softmax over the `+`/`-` logits there."""
    model = MistralForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)  # as the card loads it
    candidates = tokenizer.encode("+ -")[1:]
    tag = tokenizer.encode("ки")[-1]
    output = "\n".join(f"{step} ки" for step in steps)
    ids = torch.tensor([tokenizer.encode(f"{question} {output}")])
    with torch.no_grad():
        logits = model(ids).logits[:, :, candidates]
    return logits.softmax(dim=-1)[:, :, 0][ids == tag].tolist()


def build_value_prm(path: Path) -> Path:
    """This project's value-head format with a step rule: a sigmoid read at each step's newline (Skywork's way)."""
    from app.model.checkpoint import MANIFEST, save_value_head_checkpoint
    from app.model.recipe import ScoringRecipe

    torch.manual_seed(13)
    tokenizer = byte_level_tokenizer(bos=True, chat=True)
    backbone = LlamaModel(llama_config(tokenizer))
    head = nn.Linear(32, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.3)  # step probabilities spread over (0, 1), not saturated
    recipe = ScoringRecipe(template="chat", max_length=256)
    save_value_head_checkpoint(path, backbone=backbone, head=head, tokenizer=tokenizer, recipe=recipe)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["steps"] = {"tag": "\n", "split": "\n", "read": "sigmoid"}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def value_reference(path: Path, query: str, steps: Sequence[str]) -> list[float]:
    """Skywork's reading: the reply's steps each closed by a newline; the value head's sigmoid at those newlines."""
    backbone = LlamaModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)  # as the card loads it
    head = nn.Linear(32, 1)
    head.load_state_dict(load_file(str(path / "value_head.safetensors")))
    messages = [{"role": "user", "content": query}, {"role": "assistant", "content": "".join(s + "\n" for s in steps)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    reply = len(tokenizer.encode(prompt, add_special_tokens=False))
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    with torch.no_grad():
        hidden = backbone(ids).last_hidden_state[0]
    at = [i for i in range(reply, ids.shape[1]) if ids[0, i] == newline][: len(steps)]
    return torch.sigmoid(head(hidden[at]).squeeze(1)).tolist()
