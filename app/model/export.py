"""`reward-server export`: any loadable checkpoint -> a plain merged `AutoModelForSequenceClassification` directory.

TRL, vLLM and other servers then read the same model. Three details make the result read sequences exactly as we do:
the recipe goes along in `reward_manifest.json`; the tokenizer's chat template is wrapped to encode the recipe (its
system prompt, the closing EOS), so a card-style `apply_chat_template` reading gets our sequence; and the padding
token is made distinct from EOS, because Hugging Face's own pooling reads the last token that is not padding and would
skip a trailing EOS when pad == eos.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from app.model.checkpoint import MANIFEST, Manifest
from app.model.loading import load_reward_model
from app.model.readout import Readout
from app.model.recipe import ScoringRecipe


class ExportError(ValueError):
    """The checkpoint has no exact seq-cls equivalent; the message says why."""


def _distinct_pad(tokenizer: object) -> int:
    """A special token that is not EOS (nor BOS) to pad with; the tokenizer is switched to it."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id  # type: ignore[attr-defined]
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    if pad is not None and pad != eos:
        return int(pad)
    for token, token_id in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True):  # type: ignore[attr-defined]
        if token_id not in (eos, bos):
            tokenizer.pad_token = token  # type: ignore[attr-defined]
            return int(token_id)
    raise ExportError("the tokenizer has no special token other than BOS/EOS to pad with (pad == eos would misread)")


def recipe_template(template: str, recipe: ScoringRecipe) -> str:
    """The tokenizer's chat template, wrapped so that rendering a conversation with it alone (a model card's
    `apply_chat_template(conversation, tokenize=True)`, TRL, vLLM's `/classify` on `messages`) reads the sequence the
    recipe reads: its system prompt when the conversation has none, and a closing EOS after trailing whitespace is cut.
    Generation prompts render as before."""
    system = ""
    if recipe.system_prompt is not None:
        system = (
            "{% if messages[0]['role'] != 'system' %}"
            f"{{% set messages = [{{'role': 'system', 'content': {json.dumps(recipe.system_prompt)}}}] + messages %}}"
            "{% endif %}"
        )
    if recipe.append_eos:
        scored = (
            "{% set rendered %}" + template + "{% endset %}{{ rendered.rstrip() }}"
            "{% if not rendered.rstrip().endswith(eos_token) %}{{ eos_token }}{% endif %}"
        )
    else:
        scored = template
    return "{% if add_generation_prompt %}" + template + "{% else %}" + system + scored + "{% endif %}"


def export_seq_cls(source: Path, out: Path) -> Path:
    model = load_reward_model(source, dtype="float32", device="cpu")
    if model.readout.steps is not None:
        raise ExportError(f"{source}: a process reward model reads every step; a sequence classifier reads one token")
    module, tokenizer = model.module, copy.deepcopy(model.encoder.tokenizer)
    if module.pooling == "classifier":  # already a seq-cls encoder
        exported = module.backbone
    else:
        head = module.head
        assert isinstance(head, torch.nn.Linear)
        if head.bias is not None and float(head.bias.detach().abs().max()) > 0:
            raise ExportError(
                f"{source}: the value head has a bias; Hugging Face decoder heads have none, so exported rewards "
                "would all shift by it"
            )
        config = copy.deepcopy(module.backbone.config)
        config.num_labels = 1
        for key in ("value_head_prefix", "normalize_reward", "mean", "std"):  # OpenRLHF's: now in the manifest
            if hasattr(config, key):
                delattr(config, key)
        config.pad_token_id = _distinct_pad(tokenizer)
        exported = AutoModelForSequenceClassification.from_config(config)
        missing = exported.base_model.load_state_dict(module.backbone.state_dict(), strict=True)
        assert not missing.missing_keys
        with torch.no_grad():
            exported.score.weight.copy_(_one_row(head.weight, model.readout))
    recipe = model.encoder.recipe
    if recipe.template == "chat":
        tokenizer.chat_template = recipe_template(tokenizer.chat_template, recipe)
    tokenizer.truncation_side = tokenizer.init_kwargs["truncation_side"] = "left"  # saved: the recipe keeps the end
    out.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = Manifest(
        format="seq_cls",
        recipe=recipe,
        normalization=model.info.checkpoint_normalization,
        attribute_weights=_weights(model.readout) if module.pooling == "classifier" else None,
        extra={"exported_from": str(source), "fingerprint_of_source": model.info.model_fingerprint},
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return out


def _one_row(weight: torch.Tensor, readout: Readout) -> torch.Tensor:
    """The reward's row of a head: the output it reads, or its weighted sum of outputs folded into one."""
    if readout.weights is None:
        assert readout.index is not None
        return weight[readout.index : readout.index + 1]
    return (torch.tensor(readout.weights, dtype=weight.dtype) @ weight)[None]


def _weights(readout: Readout) -> dict[str, float] | None:
    """A classifier keeps its outputs: its manifest says how they make the reward."""
    if readout.weights is not None:
        return dict(zip(readout.labels, readout.weights, strict=True))
    return None if len(readout.labels) == 1 else {readout.labels[readout.index or 0]: 1.0}
