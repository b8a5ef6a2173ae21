"""`reward-server train`: Bradley-Terry training of a value-head reward model on preference pairs.

Inputs go through the same `RecipeEncoder` and `RewardHeadModel` the server uses, so a trained checkpoint is read at
serving time exactly as it was read in training. Only what training changed is written (top blocks, a LoRA adapter,
the head) over a base the loader rebuilds.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from app.model.checkpoint import depth, fold_temperature, save_value_head_checkpoint
from app.model.collate import collate
from app.model.cpu import cpu_description
from app.model.loading import resolve_base, transformers_errors_only
from app.model.recipe import Encoded, RecipeEncoder, ScoringRecipe
from app.model.reward_model import RewardHeadModel
from app.model.split import DecoderSplit, can_split
from app.model.steps import StepRule
from app.training.card import model_card
from app.training.config import Mode, TrainConfig
from app.training.data import PreferencePair, load_pairs
from app.training.evaluate import evaluate_margins, fit_temperature
from app.training.features import FeatureStore, PairFeatures, cache_features, top_rewards
from app.training.hacking import length_figures
from app.training.optim import (
    WeightAverage,
    length_gap,
    length_grouped_batches,
    length_weights,
    preference_loss,
    swapped,
)

Example = tuple[Encoded, Encoded] | PairFeatures


def example_length(example: Example) -> int:
    if isinstance(example, PairFeatures):
        return example.length
    return max(len(example[0]), len(example[1]))


def _blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in {"layers", "h", "layer"}:
            return name, module
    raise ValueError(f"cannot find the transformer blocks of {type(backbone).__name__}")


def trainable_prefixes(backbone: nn.Module, mode: Mode, top_k: int) -> list[str]:
    """State-dict prefixes training updates: top blocks plus everything after them (the final norm)."""
    if mode in ("head", "lora"):
        return []
    if mode == "full":
        return [""]
    name, blocks = _blocks(backbone)
    first = max(0, len(blocks) - top_k)
    prefixes = [f"{name}.{i}." for i in range(first, len(blocks))]
    top = name.split(".")[0]
    children = [n for n, _ in backbone.named_children()]
    prefixes += [f"{child}." for child in children[children.index(top) + 1 :]]
    return prefixes


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.base_dir, _ = resolve_base(config.base_model, Path.cwd(), None)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        layers = depth(self.base_dir, config.layers, Path(config.base_model))
        with transformers_errors_only() if layers else nullcontext():  # the dropped blocks' weights: unused by design
            backbone = AutoModel.from_pretrained(self.base_dir, dtype=torch.float32, **layers)
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.recipe = ScoringRecipe(
            template="chat" if chat else "concat",
            max_length=config.max_length,
            append_eos=self.tokenizer.eos_token_id is not None,
            system_prompt=config.system_prompt,
            separator="" if chat else "\n\n",
        )
        self.encoder = RecipeEncoder(self.recipe, self.tokenizer)
        self.steps: StepRule | None = None  # a process reward model's (`app.training.prm`)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.prefixes = trainable_prefixes(backbone, config.mode, config.top_k)
        for name, p in backbone.named_parameters():
            p.requires_grad = any(name.startswith(prefix) for prefix in self.prefixes)
        if config.mode == "lora":
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query", "key", "value"]
            present = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
            lora = LoraConfig(
                r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules=[t for t in targets if t in present]
            )
            backbone = get_peft_model(backbone, lora)
        hidden = backbone.config.hidden_size
        head = nn.Linear(hidden, 1, bias=False)  # as TRL and OpenRLHF: exports exactly to a seq-cls `score` head
        nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
        self.module = RewardHeadModel(backbone, head, "last_token")
        use_cache = config.mode == "top_k" and config.cache_features and can_split(backbone)
        self.split = DecoderSplit.of(backbone, config.top_k) if use_cache else None
        self.store: FeatureStore | None = None
        if self.split is not None and config.feature_cache is not None:
            self.store = FeatureStore(config.feature_cache, self.split.bottom, config.bf16)

    # ---- data ---------------------------------------------------------------------------------------
    def encode(self, pairs: Sequence[PreferencePair]) -> list[tuple[Encoded, Encoded]]:
        flat = self.encoder.encode_batch([x for pair in pairs for x in pair.inputs()])
        return list(zip(flat[0::2], flat[1::2], strict=True))

    def examples(self, pairs: Sequence[PreferencePair], desc: str) -> list[Example]:
        """Token pairs, or (feature caching) the frozen blocks' hidden states, computed once here."""
        encoded = self.encode(pairs)
        if self.split is None:
            return list(encoded)
        from tqdm import tqdm

        bottom, multiple = self.split.bottom.eval(), self.config.pad_to_multiple_of
        bar = tqdm(total=len(encoded), desc=f"caching {desc}", unit="pair", dynamic_ncols=True, file=sys.stderr)
        with bar, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):  # as the top blocks run
            return list(cache_features(bottom, encoded, self.store, multiple, bar.update))

    def pair_rewards(self, batch: Sequence[Example]) -> torch.Tensor:
        """Rewards chosen0, rejected0, chosen1, ... for a batch of examples."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            if self.split is not None:
                features = list(batch)  # type: ignore[arg-type]
                return top_rewards(self.split.top, self.module.head, features, self.config.pad_to_multiple_of).float()
            encoded = [x for ex in batch for x in ex]  # type: ignore[union-attr]
            b = collate(encoded, self.pad_id, self.config.pad_to_multiple_of)
            return self.module(b.input_ids, b.attention_mask, b.position_ids, b.token_type_ids)[:, 0]

    @torch.no_grad()
    def rewards(self, examples: Sequence[Example], batch_pairs: int = 16) -> tuple[list[float], list[float]]:
        """Each pair's chosen and rejected reward, batched by length."""
        self.module.eval()
        order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
        chosen, rejected = [0.0] * len(examples), [0.0] * len(examples)
        for start in range(0, len(order), batch_pairs):
            idx = order[start : start + batch_pairs]
            r = self.pair_rewards([examples[i] for i in idx]).tolist()
            for j, i in enumerate(idx):
                chosen[i], rejected[i] = r[2 * j], r[2 * j + 1]
        return chosen, rejected

    def trained_blocks(self) -> list[nn.Parameter]:
        """The backbone parameters training changes (the head has its own learning rate and stays float32)."""
        return [p for n, p in self.module.named_parameters() if p.requires_grad and not n.startswith("head.")]

    def stored(self) -> AbstractContextManager[None]:
        """The trained blocks rounded to `delta_dtype`, as the checkpoint will hold them."""
        dtype = getattr(torch, self.config.delta_dtype)
        params = self.trained_blocks()
        return nullcontext() if dtype == torch.float32 else swapped(params, [p.to(dtype) for p in params])

    def margins(self, examples: Sequence[Example]) -> list[float]:
        return [c - r for c, r in zip(*self.rewards(examples), strict=True)]

    # ---- loop ---------------------------------------------------------------------------------------
    def train(self, command: str | None = None) -> dict[str, object]:
        """Runs every epoch, keeps the best on dev, calibrates; `command` is recorded in the model card."""
        self.command = command or shlex.join(sys.argv)
        from tqdm import tqdm

        cfg = self.config
        started = time.monotonic()  # the measured training time includes encoding and feature caching
        rng = random.Random(cfg.seed)
        train_pairs = load_pairs(cfg.train_file)
        if cfg.max_train_pairs is not None and cfg.max_train_pairs < len(train_pairs):
            train_pairs = random.Random(cfg.seed).sample(train_pairs, cfg.max_train_pairs)
        if cfg.bootstrap:
            train_pairs = random.Random(cfg.seed).choices(train_pairs, k=len(train_pairs))
        dev_pairs = load_pairs(cfg.dev_file, cfg.max_dev_pairs) if cfg.dev_file else []
        train_enc = self.examples(train_pairs, "train")
        dev_enc = self.examples(dev_pairs, "dev") if dev_pairs else []
        reused = self.store.reused_seconds if self.store else 0.0  # times below are from scratch: they add it
        margins_wanted = torch.tensor([p.margin for p in train_pairs])
        weights = {k: cfg.length_term * w for k, w in length_weights(train_pairs).items()} if cfg.length_term else {}
        length_prior = torch.tensor([weights.get(p.dataset, 0.0) * length_gap(p) for p in train_pairs])
        lengths = [example_length(ex) for ex in train_enc]
        params = self.trained_blocks()
        optim = torch.optim.AdamW(
            [{"params": params, "lr": cfg.lr}, {"params": list(self.module.head.parameters()), "lr": cfg.head_lr}],
            weight_decay=cfg.weight_decay,
        )
        steps_per_epoch = math.ceil(len(train_enc) / cfg.batch_pairs / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        warmup = int(total * cfg.warmup_ratio)

        def rate(s: int) -> float:
            decay = 1.0 if cfg.lr_schedule == "constant" else max(0.0, (total - s) / max(1, total - warmup))
            return min(1.0, (s + 1) / max(1, warmup)) * decay

        sched = torch.optim.lr_scheduler.LambdaLR(optim, rate)
        trained = [p for g in optim.param_groups for p in g["params"]]
        average = None if cfg.average_from is None else WeightAverage(trained, int(total * cfg.average_from))
        history: list[dict[str, float]] = []
        best: tuple[float, int] | None = None
        best_margins: list[float] = []
        for epoch in range(1, cfg.epochs + 1):
            self.module.train()
            batches = length_grouped_batches(lengths, cfg.batch_pairs, rng)
            bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", dynamic_ncols=True, file=sys.stderr)
            loss_avg = acc_avg = 0.0
            for step, idx in enumerate(bar, start=1):
                r = self.pair_rewards([train_enc[i] for i in idx])
                chosen, rejected = r[0::2], r[1::2]
                wanted = margins_wanted[idx] - length_prior[idx]  # the logit: r_c - r_r + w x gap - margin
                loss = preference_loss(chosen, rejected, wanted, cfg.label_smoothing, cfg.center_coef)
                (loss / cfg.grad_accum).backward()
                if step % cfg.grad_accum == 0 or step == len(batches):
                    torch.nn.utils.clip_grad_norm_(trained, 1.0)
                    optim.step()
                    sched.step()
                    optim.zero_grad(set_to_none=True)
                    if average is not None:
                        average.update()
                loss_value = float(loss.detach())
                loss_avg = 0.98 * loss_avg + 0.02 * loss_value if step > 1 else loss_value
                acc_avg = 0.98 * acc_avg + 0.02 * float((chosen > rejected).float().mean()) if step > 1 else 0.5
                bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc_avg:.3f}")
            elapsed = time.monotonic() - started + reused
            record: dict[str, float] = {"epoch": epoch, "train_loss": loss_avg, "elapsed_s": elapsed}
            # evaluate and keep the mean, as the checkpoint stores it
            with average.applied() if average is not None else nullcontext(), self.stored():
                dev_margins: list[float] = []
                if dev_enc:
                    chosen_r, rejected_r = self.rewards(dev_enc)
                    dev_margins = [c - r for c, r in zip(chosen_r, rejected_r, strict=True)]
                    result = evaluate_margins(dev_margins)
                    record.update(dev_accuracy=result.accuracy, dev_log_loss=result.log_loss, dev_ece=result.ece)
                    record.update(length_figures(dev_pairs, chosen_r, rejected_r, "dev_"))
                    print(
                        f"epoch {epoch}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("dev_")),
                        file=sys.stderr,
                    )
                history.append(record)
                score = record.get("dev_accuracy", -record["train_loss"])
                if best is None or score > best[0]:
                    best = (score, epoch)
                    best_margins = dev_margins
                    self.save(history, temperature=None)
        assert best is not None
        temperature = None
        if cfg.calibrate and best_margins:
            temperature = fit_temperature(best_margins)  # the kept epoch's dev margins
            fold_temperature(cfg.output, temperature)
        wall = time.monotonic() - started
        summary = {
            "best_epoch": best[1],
            "history": history,
            "temperature": temperature,
            "train_seconds": wall + reused,  # from scratch, slightly over: the wall time includes reading entries back
            "wall_seconds": wall,
            "reused_feature_seconds": reused,
            "cpu": cpu_description(),
            "length_weights": weights or None,
        }
        (cfg.output / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        card = model_card(cfg, self.recipe, summary, len(train_pairs), len(dev_pairs), self.command)
        (cfg.output / "README.md").write_text(card)
        return summary

    def base_reference(self) -> str | None:
        """Registry keys stay keys; a local base is stored as an absolute path; full fine-tuning of a local base
        saves the whole backbone (None)."""
        from app.model.backbones import REGISTRY

        if self.config.base_model in REGISTRY:
            return self.config.base_model
        return None if self.config.mode == "full" else str(self.base_dir)

    def save(self, history: list[dict[str, float]], temperature: float | None) -> None:
        cfg = self.config
        backbone = self.module.backbone
        extra = {
            "train_config": json.loads(cfg.model_dump_json()),
            "history": history,
            "temperature": temperature,
            "command": self.command,
        }
        save_value_head_checkpoint(
            cfg.output,
            backbone=backbone,
            head=self.module.head,
            tokenizer=self.tokenizer,
            recipe=self.recipe,
            base_model=self.base_reference(),
            trained_prefixes=self.prefixes or None,
            delta_dtype=getattr(torch, cfg.delta_dtype),
            dtype="bfloat16" if cfg.bf16 else "float32",  # what the forward ran in: `REWARD_DTYPE=auto` serves it
            num_layers=cfg.layers,
            extra=extra,
            steps=self.steps,
        )
