"""Tiny checkpoints of every supported format, built in a few seconds with random weights and trained tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaModel,
    PreTrainedTokenizerFast,
)

C = TypeVar("C")
CORPUS = [
    "Hello, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Write a short poem about the sea and the wind and the stars at night.",
    "I'm sorry, I can't help with that request, but here is something else.",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
] * 4

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _byte_bpe(specials: list[str], bos: str | None, corpus: list[str] = CORPUS, vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained on `corpus`; with `bos`, its post-processor adds that BOS (as Llama's does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def byte_level_tokenizer(*, bos: bool, chat: bool) -> PreTrainedTokenizerFast:
    """Llama-like when `bos` (the post-processor adds BOS), GPT-2-like otherwise; ChatML template when `chat`."""
    tok = _byte_bpe(SPECIALS, "<|im_start|>" if bos else None)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    if chat:
        out.chat_template = CHATML
    return out


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )


def llama_config(tokenizer: PreTrainedTokenizerFast, **extra: object) -> LlamaConfig:
    return small_config(LlamaConfig, tokenizer, **extra)


def small_config(kind: type[C], tokenizer: PreTrainedTokenizerFast, **extra: object) -> C:
    """A 2-block, 32-wide decoder config of `kind` (Llama, Qwen2, Mistral) for `tokenizer`."""
    return kind(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def _spread_head(linear: torch.nn.Linear) -> None:
    """Random init gives rewards ~1e-2; scale the head so rewards are of order 1 (the tolerance is absolute)."""
    with torch.no_grad():
        linear.weight.normal_(0, 1.0)


def build_llama_seq_cls(path: Path, *, chat: bool = True, num_labels: int = 1) -> Path:
    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer(bos=True, chat=chat)
    model = LlamaForSequenceClassification(llama_config(tokenizer, num_labels=num_labels))
    _spread_head(model.score)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_gpt2_seq_cls(path: Path) -> Path:
    torch.manual_seed(1)
    tokenizer = byte_level_tokenizer(bos=False, chat=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2ForSequenceClassification(config)
    _spread_head(model.score)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_bert_seq_cls(path: Path) -> Path:
    torch.manual_seed(2)
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    _spread_head(model.classifier)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_value_head(path: Path) -> Path:
    """This project's own format: base model in `base/`, a trained delta (the top block), the head, the manifest."""
    from app.model.checkpoint import save_value_head_checkpoint
    from app.model.recipe import ScoringRecipe

    torch.manual_seed(3)
    tokenizer = byte_level_tokenizer(bos=True, chat=True)
    base = LlamaModel(llama_config(tokenizer))
    base.save_pretrained(path / "base")
    tokenizer.save_pretrained(path / "base")
    trained = LlamaModel(llama_config(tokenizer))  # "fine-tuned": different top block weights
    trained.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in trained.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    head = torch.nn.Linear(32, 1)
    _spread_head(head)
    save_value_head_checkpoint(
        path,
        backbone=trained,
        head=head,
        tokenizer=tokenizer,
        recipe=ScoringRecipe(template="chat", max_length=256, append_eos=True),
        base_model="base",
        trained_prefixes=["layers.1."],
    )
    return path


def build_members(root: Path, count: int, seed: int = 5) -> list[Path]:
    """What `reward-server train --ensemble` writes, in miniature: `count` value-head checkpoints over one base in
    `root/base`, each with its own top block, final norm and head (seeds differ)."""
    from app.model.checkpoint import save_value_head_checkpoint
    from app.model.recipe import ScoringRecipe

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer(bos=True, chat=True)
    base = LlamaModel(llama_config(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    paths = []
    for k in range(count):
        torch.manual_seed(100 + k)
        trained = LlamaModel(llama_config(tokenizer))
        trained.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in [*trained.layers[1].parameters(), *trained.norm.parameters()]:
                p.add_(torch.randn_like(p) * 0.1)
        head = torch.nn.Linear(32, 1, bias=False)
        _spread_head(head)
        save_value_head_checkpoint(
            root / f"member{k}",
            backbone=trained,
            head=head,
            tokenizer=tokenizer,
            recipe=ScoringRecipe(template="chat", max_length=256, append_eos=True),
            base_model=str(root / "base"),
            trained_prefixes=["layers.1.", "norm."],
        )
        paths.append(root / f"member{k}")
    return paths


def build_peft(path: Path, base_dir: Path) -> Path:
    """TRL's LoRA layout: an adapter over a seq-cls base, the score head in `modules_to_save`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(4)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter is not the identity
            if "modules_to_save" in name and "score" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(path)
    config_file = path / "adapter_config.json"
    cfg = json.loads(config_file.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    config_file.write_text(json.dumps(cfg))
    return path


def build_openrlhf(path: Path) -> Path:
    """OpenRLHF's layout: base weights under `model.`, the head under `value_head_prefix`, mean/std in config."""
    torch.manual_seed(5)
    tokenizer = byte_level_tokenizer(bos=True, chat=True)
    config = llama_config(tokenizer)
    base = LlamaModel(config)
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state["value_head.weight"] = torch.randn(1, 32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    raw = config.to_dict()
    raw.update(
        architectures=["LlamaForCausalLM"], value_head_prefix="value_head", normalize_reward=True, mean=0.5, std=2.0
    )
    (path / "config.json").write_text(json.dumps(raw))
    tokenizer.save_pretrained(path)
    return path


# Chat-template families as hub checkpoints ship them (no manifest): where the BOS comes from, how roles are named.
FAMILIES: dict[str, dict[str, object]] = {
    "llama3": {  # the template writes the BOS, and the tokenizer would add one too
        "specials": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|pad|>",
        "template": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
        "\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    },
    "gemma": {  # BOS both ways, the assistant's turn is `model`
        "specials": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "template": "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
        "else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    },
    "chatml": {  # no BOS; a default system prompt when the conversation has none (Qwen)
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "template": "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant."
        "<|im_end|>\n' }}{% endif %}" + CHATML,
    },
}


def build_family(path: Path, family: str) -> Path:
    """A Llama seq-cls checkpoint with the family's tokenizer conventions and chat template."""
    spec = FAMILIES[family]
    bos = spec["bos"]
    tok = _byte_bpe(list(spec["specials"]), bos if isinstance(bos, str) else None)  # type: ignore[call-overload]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=spec["eos"], pad_token=spec["pad"]
    )
    tokenizer.chat_template = spec["template"]
    torch.manual_seed(6)
    model = LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1))
    _spread_head(model.score)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
