"""`reward-server bench --load`: host memory and time to load a checkpoint, in every format we load, each in a fresh
process (a peak RSS belongs to one process). The checkpoints are generated: a Llama of about the size users serve,
random weights saved in bf16, as a sequence classifier, as a value head over a local base, and as a LoRA adapter.

Run as `python -m app.bench.load PATH DTYPE DEVICE` to measure one load; it prints one JSON object.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerBase

from app.model.checkpoint import save_value_head_checkpoint
from app.model.recipe import ScoringRecipe

FORMATS = ("seq_cls", "value_head", "peft")


@dataclass(frozen=True)
class Generated:
    path: Path
    weights: list[Path]  # every weight file loading it reads (a value head's base too): its size

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weights)


def shape_for(params: float, vocab: int) -> tuple[int, int]:
    """(hidden size, layers) of a Llama with about `params` parameters (a layer holds ~12.25 hidden^2)."""
    hidden = 2048 if params >= 4e8 else 1024
    return hidden, max(1, round((params - vocab * hidden) / (12.25 * hidden**2)))


def generate(root: Path, tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int) -> dict[str, Generated]:
    """The three formats of one random bf16 Llama (seeded), written under `root`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification._from_config(config, dtype=torch.bfloat16)
    seq_cls, base, value_head, peft = (root / name for name in ("seq_cls", "base", "value_head", "peft"))
    model.save_pretrained(seq_cls)
    tokenizer.save_pretrained(seq_cls)
    model.model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    save_value_head_checkpoint(
        value_head,
        backbone=model.model,
        head=torch.nn.Linear(hidden, 1, bias=False),
        tokenizer=tokenizer,
        recipe=ScoringRecipe(template="concat", max_length=2048, separator="\n\n"),
        base_model=str(base),
        trained_prefixes=[f"layers.{layers - 1}.", "norm."],
    )
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
    adapter.save_pretrained(peft)
    config_file = peft / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(seq_cls)}))
    files = {name: sorted(path.glob("*.safetensors")) for name, path in (("seq_cls", seq_cls), ("base", base))}
    return {
        "seq_cls": Generated(seq_cls, files["seq_cls"]),
        "value_head": Generated(value_head, [*files["base"], *sorted(value_head.glob("*.safetensors"))]),
        "peft": Generated(peft, [*files["seq_cls"], *sorted(peft.glob("*.safetensors"))]),
    }


def measure(path: Path, dtype: str, device: str) -> dict[str, float]:
    """One load in a fresh process: peak host RSS (bytes), seconds to loaded and to the first reward."""
    out = subprocess.run(
        [sys.executable, "-m", "app.bench.load", str(path), dtype, device], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _peak_rss() -> int:
    """This process's peak RSS since it exec'd (`VmHWM`); `ru_maxrss` would carry the forking parent's over."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def _measure_here(path: Path, dtype: str, device: str) -> dict[str, float]:
    from app.model.loading import load_reward_model
    from app.model.recipe import ScoringInput

    began = time.perf_counter()
    model = load_reward_model(path, dtype=dtype, device=device)
    loaded = time.perf_counter() - began
    model.score(model.encoder.encode_batch([ScoringInput("Hello, who are you?", "I am a helpful assistant.")]))
    result = {
        "peak_rss_bytes": _peak_rss(),
        "load_s": loaded,
        "ready_s": time.perf_counter() - began,
    }
    if model.device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(model.device)
    return result


def report(root: Path, params: float, dtype: str, device: str) -> str:
    """Generate, measure every format, and the table `reward-server bench --load` prints."""
    from app.model import backbones

    tokenizer_dir = backbones.resolve("smollm2-135m-instruct")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, layers = shape_for(params, len(tokenizer))
    generated = generate(root, tokenizer, hidden, layers)
    gb = 1024**3
    lines = [
        f"Load: a random Llama ({hidden} hidden, {layers} layers) saved in bf16, loaded as {dtype} on {device}",
        "",
        "| format | weights GB | peak host RSS GB | peak / (1.15 x weights + 0.8 GB) | loaded s | first reward s |",
        "|---|---|---|---|---|---|",
    ]
    for name in FORMATS:
        g = generated[name]
        m = measure(g.path, dtype, device)
        bound = 1.15 * g.bytes + 0.8 * gb
        on_device = f"; peak device memory {m['peak_device_bytes'] / gb:.2f} GB" if "peak_device_bytes" in m else ""
        lines.append(
            f"| {name} | {g.bytes / gb:.2f} | {m['peak_rss_bytes'] / gb:.2f} | {m['peak_rss_bytes'] / bound:.2f} | "
            f"{m['load_s']:.1f} | {m['ready_s']:.1f}{on_device} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(_measure_here(Path(sys.argv[1]), sys.argv[2], sys.argv[3])))
