"""Load any supported checkpoint directory into a `RewardModel`, or fail fast with a message naming the problem.

Formats, detected in this order:
- `value_head`: `reward_manifest.json` written by `reward-server train`: a base model (registry key, a path, or
  this directory), optionally a `backbone_delta` of trained parameters and/or a PEFT `adapter`, plus the head in
  `value_head.safetensors`.
- `peft`: a PEFT adapter (`adapter_config.json`) over a sequence-classification base, head in `modules_to_save`
  (what TRL writes with LoRA).
- `openrlhf`: a base model with a `Linear(hidden, 1)` under `value_head_prefix`, optional `mean`/`std` in config.json.
- `seq_cls`: Hugging Face `AutoModelForSequenceClassification` (TRL's RewardTrainer), decoder or encoder.
Any of them may carry a `reward_manifest.json` that pins the scoring recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from app.model import backbones
from app.model.checkpoint import (
    CheckpointError,
    Manifest,
    Normalization,
    depth,
    detect_format,
    inferred_recipe,
    openrlhf_recipe,
    read_json,
    read_manifest,
)
from app.model.cpu import cpu_has_fast_bf16
from app.model.fingerprint import content_digest, model_fingerprint, versions
from app.model.heads import (
    hidden_size,
    load_head,
    logit_head,
    outputs_of,
    process_reward_head,
    safetensors_files,
    token_pair,
)
from app.model.info import ModelInfo
from app.model.readout import readout_for, step_readout
from app.model.recipe import RecipeEncoder
from app.model.reference import Reference, StateProbe
from app.model.reward_model import RewardHeadModel, RewardModel
from app.model.steps import QWEN_RULE, StepEncoder, StepRule, card_recipe

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()


# ---- small helpers ---------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, stated: str | None) -> tuple[torch.dtype, str]:
    """(dtype, why): `auto` serves the dtype the checkpoint states it was trained in (manifest, else `config.json`),
    since another one moves its rewards; only a checkpoint that states none gets the device's fastest."""
    if name != "auto":
        return DTYPES[name], "REWARD_DTYPE"
    if stated in DTYPES:
        if stated == "float16" and device.type == "cpu":
            return torch.float32, "the checkpoint's float16, as float32: CPUs lack float16 kernels"
        return DTYPES[stated], f"the checkpoint's ({stated})"
    if device.type == "cuda":
        fast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return fast, "the checkpoint states no dtype: the GPU's half precision"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "the checkpoint states no dtype: bfloat16, native on this CPU"
    return torch.float32, "the checkpoint states no dtype: float32 (this CPU has no bfloat16 units)"


def stated_dtype(manifest: Manifest | None, weights: Path) -> str | None:
    """The dtype a checkpoint says it was trained in: our manifest's, else its weights' `config.json`."""
    if manifest is not None and manifest.dtype is not None:
        return manifest.dtype
    config = weights / "config.json"
    if not config.exists():
        return None
    raw = read_json(config)
    value = raw.get("dtype") or raw.get("torch_dtype")
    return str(value) if value else None


def resolve_base(ref: str, checkpoint: Path, cache_dir: Path | None) -> tuple[Path, str]:
    """(directory, identity for the fingerprint) of a base model reference."""
    if ref in backbones.REGISTRY:
        try:
            return backbones.resolve(ref, cache_dir), backbones.identity(ref)
        except backbones.BackboneError as exc:
            raise CheckpointError(f"{checkpoint}: base model {ref!r}: {exc}") from exc
    for candidate in (checkpoint / ref, Path(ref).expanduser()):
        if (candidate / "config.json").exists():
            return candidate.resolve(), f"path:{content_digest(candidate)[:16]}"  # by content, not by name
    raise CheckpointError(
        f"{checkpoint}: base model {ref!r} not found: not a registered backbone "
        f"({', '.join(backbones.REGISTRY)}) nor a directory with config.json (relative to the checkpoint or absolute)"
    )


# ---- per-format builders ---------------------------------------------------------------------------


def _seq_cls_module(model: nn.Module) -> RewardHeadModel:
    score = getattr(model, "score", None)
    if isinstance(score, nn.Linear):  # decoders: HF pools the last token; we pool by attention mask
        return RewardHeadModel(model.base_model, score.float(), "last_token")
    return RewardHeadModel(model, None, "classifier")


def _check_weight_files(where: Path) -> None:
    """Name the broken file before transformers reports a bare deserialization error."""
    files = safetensors_files(where)
    if not files and not list(where.glob("*.bin")):
        raise CheckpointError(f"{where}: no weights (*.safetensors or *.bin)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise CheckpointError(f"{file}: unreadable safetensors ({exc})") from exc


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' log at error level: its load report would list every tensor it did not use as a warning."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _from_pretrained(cls: Any, where: Path, **kwargs: Any) -> Any:
    if cls is not AutoTokenizer:
        _check_weight_files(where)
    try:
        return cls.from_pretrained(where, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/RuntimeError
        raise CheckpointError(f"{where}: cannot load {getattr(cls, '__name__', cls)}: {exc}") from exc


def _merge_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise CheckpointError(f"{adapter_dir}: adapter_config.json missing")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as exc:
        raise CheckpointError(f"{adapter_dir}: cannot apply the PEFT adapter: {exc}") from exc
    return peft_model.merge_and_unload()


def load_reward_model(
    path: Path | str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_length: int | None = None,
    head_index: int | None = None,
    attribute_weights: dict[str, float] | None = None,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
    device_map: str | None = None,
    probe: bool = True,
    steps: StepRule | None = None,
) -> RewardModel:
    """Weights load straight into the serving dtype on the serving device (never through a float32 host copy: an
    8B model would need ~50 GB of host memory); value heads stay float32. `device_map` (e.g. `auto`) spreads the
    backbone over several GPUs. `head_index`/`attribute_weights`: how a head with several outputs makes the reward
    (`app.model.readout`; the weights default to the manifest's). `probe`: the monitor's state distance, where the
    checkpoint has a reference (`app.model.reference`). `steps`: a process reward model's step rule, over the
    manifest's (`app.model.steps`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    manifest = read_manifest(path)
    fmt = detect_format(path, manifest)
    base_dir, base_identity = path, None  # the weights the backbone loads from
    if fmt == "peft":
        adapter_cfg = read_json(path / "adapter_config.json")
        ref = (manifest.base_model if manifest else None) or adapter_cfg.get("base_model_name_or_path")
        if not ref:
            raise CheckpointError(f"{path}/adapter_config.json: no base_model_name_or_path")
        base_dir, base_identity = resolve_base(str(ref), path, cache_dir)
    elif fmt == "value_head" and manifest is not None and manifest.base_model:
        base_dir, base_identity = resolve_base(manifest.base_model, path, cache_dir)
    torch_device = resolve_device(device)
    torch_dtype, dtype_source = resolve_dtype(dtype, torch_device, stated_dtype(manifest, base_dir))
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if device_map is not None or torch_device.type != "cpu":
        common["device_map"] = device_map or str(torch_device)
    normalization = manifest.normalization if manifest else None
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer_dir = path if has_tokenizer else base_dir
    tokenizer = _from_pretrained(AutoTokenizer, tokenizer_dir, trust_remote_code=trust_remote_code)
    rule = steps or (manifest.steps if manifest else None) or (QWEN_RULE if fmt == "process_reward" else None)

    if fmt == "seq_cls":
        model = _from_pretrained(AutoModelForSequenceClassification, path, **common)
        module, config = _seq_cls_module(model), model.config
    elif fmt == "peft":
        base = _from_pretrained(AutoModelForSequenceClassification, base_dir, num_labels=1, **common)
        model = _merge_adapter(base, path)
        module, config = _seq_cls_module(model), model.config
    elif fmt == "openrlhf":
        raw = read_json(path / "config.json")
        prefix = str(raw.get("value_head_prefix", "score"))
        backbone = _from_pretrained(AutoModel, path, **common)
        config = backbone.config
        head = None
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt") as fh:
                if f"{prefix}.weight" in fh.keys():  # noqa: SIM118
                    head = load_head(file, hidden_size(config), prefix=f"{prefix}.")
        if head is None:
            raise CheckpointError(f"{path}: no '{prefix}.weight' tensor in any *.safetensors (value_head_prefix)")
        module = RewardHeadModel(backbone, head, "last_token")
        if raw.get("normalize_reward") and "mean" in raw and "std" in raw and normalization is None:
            normalization = Normalization(mean=float(raw["mean"]), std=float(raw["std"]))
    elif fmt in ("process_reward", "causal_lm"):  # Qwen2.5-Math-PRM's head, or two tokens' logits (math-shepherd)
        if fmt == "causal_lm" and (rule is None or rule.logits is None):
            raise CheckpointError(
                f"{path}: a causal LM, with no reward head (no sequence-classification head, value_head_prefix or "
                f"manifest); served as a process reward model it needs a step rule naming its good and bad tokens "
                f'(REWARD_STEPS, e.g. {{"tag": " ки", "read": "softmax", "logits": ["+", "-"]}})'
            )
        with transformers_errors_only():  # the LM head or score head it leaves: read below, by design
            backbone = _from_pretrained(AutoModel, path, **common)
        config = backbone.config
        if fmt == "process_reward":
            head: nn.Module = process_reward_head(path, hidden_size(config))
        else:
            head = logit_head(path, config, token_pair(tokenizer, rule.logits))  # type: ignore[union-attr]
        module = RewardHeadModel(backbone, head, "last_token")
    else:  # value_head
        assert manifest is not None
        shallower = depth(base_dir, manifest.num_layers, path)
        with transformers_errors_only() if shallower else nullcontext():  # the dropped blocks: unused by design
            backbone = _from_pretrained(AutoModel, base_dir, **common, **shallower)
        if manifest.backbone_delta:
            delta_file = path / manifest.backbone_delta
            if not delta_file.exists():
                raise CheckpointError(f"{delta_file}: backbone delta missing")
            delta = load_file(str(delta_file))
            result = backbone.load_state_dict(delta, strict=False)
            if result.unexpected_keys:
                raise CheckpointError(
                    f"{delta_file}: {len(result.unexpected_keys)} tensors do not belong to the base model, "
                    f"e.g. {result.unexpected_keys[:3]}"
                )
        if manifest.adapter:
            backbone = _merge_adapter(backbone, path / manifest.adapter)
        config = backbone.config
        head = load_head(path / manifest.head_file, hidden_size(config))
        module = RewardHeadModel(backbone, head, "last_token")

    outputs = outputs_of(module.head) if module.head is not None else int(config.num_labels)
    labels = (manifest.attributes if manifest else None) or (getattr(config, "id2label", None) if outputs > 1 else None)
    stated = manifest.attribute_weights if manifest and head_index is None else None  # a setting overrides it
    weights = attribute_weights or stated
    readout = step_readout(rule, outputs, path) if rule else readout_for(outputs, labels, head_index, weights, path)
    reference = Reference.read(path) if probe and rule is None else None
    if reference is not None and module.pooling == "last_token":
        module.probe = StateProbe(reference).to(module.backbone.get_input_embeddings().weight.device)
        readout = dataclasses.replace(readout, distance=outputs)  # the column after the head's
    if manifest is not None and manifest.recipe is not None:
        recipe = manifest.recipe
    elif fmt == "openrlhf":
        recipe = openrlhf_recipe(tokenizer, config)
    else:
        recipe = card_recipe(fmt, inferred_recipe(tokenizer, config, module.pooling))
    if max_length is not None:
        recipe = recipe.model_copy(update={"max_length": max_length})
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and recipe.max_length > positions:  # every long item would fail in the forward
        raise CheckpointError(
            f"{path}: max_length {recipe.max_length} (REWARD_MAX_LENGTH or the manifest's recipe) is over the model's "
            f"max_position_embeddings ({positions})"
        )
    try:
        encoder = StepEncoder(recipe, tokenizer, rule) if rule else RecipeEncoder(recipe, tokenizer)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    module.eval()
    if module.head is not None:
        module.head.to(device=torch_device)
    inputs_device = module.backbone.get_input_embeddings().weight.device  # the first device, under a device map
    info = ModelInfo(
        model_path=str(path),
        format=fmt,
        architecture=(getattr(config, "architectures", None) or [type(module.backbone).__name__])[0],
        model_type=config.model_type,
        pooling=module.pooling,
        head_index=readout.index,
        attributes=list(readout.labels) if len(readout.labels) > 1 and rule is None else None,
        steps=rule,
        base_model=base_identity,
        num_parameters=sum(p.numel() for p in module.parameters()),
        dtype=str(torch_dtype).removeprefix("torch."),
        dtype_source=dtype_source,
        versions=versions(),
        device=str(inputs_device),
        device_map=device_map,
        max_length=recipe.max_length,
        recipe=recipe.model_dump(),
        checkpoint_normalization=normalization,
        monitor_reference=reference.summary() if reference is not None else None,
        model_fingerprint=model_fingerprint(
            path,
            base=base_identity,
            recipe=recipe.model_dump(),
            readout=readout.fingerprint_part(),
            dtype=torch_dtype,
            device=inputs_device,
            attention=module.attention,
        ),
    )
    log.info("loaded %s checkpoint %s (%s, %s)", fmt, path, info.architecture, info.dtype)
    return RewardModel(module, encoder, int(pad_id), inputs_device, torch_dtype, info, readout)
