"""Every checkpoint format loads through the real loader and matches a direct forward pass of the model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from app.model.checkpoint import CheckpointError, Normalization
from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel

ITEMS = [
    ScoringInput("Human: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Spain?", "Madrid."),
    ScoringInput("Write a short poem about the sea.", "The wind and the stars at night, the sea."),
    ScoringInput("hi", "hello"),
]


def reference(name: str, path: Path, ids: list[int], types: list[int] | None) -> float:
    """The checkpoint's reward computed directly with transformers/peft, one unpadded sequence at a time."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if name in ("llama", "gpt2", "bert"):
            model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            kwargs = {"token_type_ids": torch.tensor([types])} if types is not None else {}
            return float(model(input_ids=x, **kwargs).logits[0, 0])
        if name == "peft":
            base_dir = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(base_dir)
            return float(PeftModel.from_pretrained(base, path).eval()(input_ids=x).logits[0, 0])
        if name == "value_head":
            model = AutoModel.from_pretrained(path / "base").eval()
            model.load_state_dict(load_file(str(path / "backbone_delta.safetensors")), strict=False)
            head = load_file(str(path / "value_head.safetensors"))
            h = model(input_ids=x).last_hidden_state[0, -1]
            return float(h @ head["weight"][0] + head["bias"][0])
        if name == "openrlhf":
            model = AutoModel.from_pretrained(path).eval()
            w = load_file(str(path / "model.safetensors"))["value_head.weight"]
            return float(model(input_ids=x).last_hidden_state[0, -1] @ w[0])
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "value_head", "peft", "openrlhf"])
def test_matches_direct_forward(name: str, checkpoints: dict[str, Path], load: Callable[..., RewardModel]) -> None:
    model = load(name)
    encoded = model.encoder.encode_batch(ITEMS)
    batched = model.score(encoded)
    for enc, got in zip(encoded, batched, strict=True):
        assert got == pytest.approx(reference(name, checkpoints[name], enc.input_ids, enc.token_type_ids), abs=1e-5)
    assert len(set(batched)) == len(batched)  # not a constant


def test_formats_and_info(load: Callable[..., RewardModel]) -> None:
    expected = {
        "llama": ("seq_cls", "last_token", "chat"),
        "gpt2": ("seq_cls", "last_token", "concat"),
        "bert": ("seq_cls", "classifier", "text_pair"),
        "value_head": ("value_head", "last_token", "chat"),
        "peft": ("peft", "last_token", "chat"),
        "openrlhf": ("openrlhf", "last_token", "chat"),
    }
    for name, (fmt, pooling, template) in expected.items():
        info = load(name).info
        assert (info.format, info.pooling, info.recipe["template"]) == (fmt, pooling, template), name
        assert len(info.model_fingerprint) == 16
    assert load("openrlhf").info.checkpoint_normalization == Normalization(mean=0.5, std=2.0)
    assert load("value_head").info.recipe["append_eos"] is True


def test_fingerprint_tracks_weights_and_recipe(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(checkpoints["gpt2"], tmp_path / "gpt2")
    first = load_reward_model(copy, dtype="float32", device="cpu").info.model_fingerprint
    assert load_reward_model(copy, dtype="float32", device="cpu").info.model_fingerprint == first
    assert load_reward_model(copy, dtype="float32", device="cpu", max_length=64).info.model_fingerprint != first
    (copy / "README.md").write_text("docs do not change scores")
    assert load_reward_model(copy, dtype="float32", device="cpu").info.model_fingerprint == first
    config = json.loads((copy / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert load_reward_model(copy, dtype="float32", device="cpu").info.model_fingerprint != first


def test_multi_label_head_needs_an_index(checkpoints: dict[str, Path], load: Callable[..., RewardModel]) -> None:
    with pytest.raises(CheckpointError, match=r"3 outputs.*REWARD_ATTRIBUTE_WEIGHTS.*REWARD_HEAD_INDEX"):
        load_reward_model(checkpoints["llama_3labels"], dtype="float32", device="cpu")
    model = load("llama_3labels", head_index=2)
    enc = model.encoder.encode(ITEMS[0])
    hf = AutoModelForSequenceClassification.from_pretrained(checkpoints["llama_3labels"]).eval()
    with torch.no_grad():
        want = float(hf(input_ids=torch.tensor([enc.input_ids])).logits[0, 2])
    assert model.score([enc])[0] == pytest.approx(want, abs=1e-5)


def _broken(src: Path, dst: Path, mutate: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


@pytest.mark.parametrize(
    ("source", "mutate", "message"),
    [
        (None, lambda p: None, r"does not exist"),
        ("empty", lambda p: None, r"no config\.json"),
        ("gpt2", lambda p: (p / "model.safetensors").write_bytes(b"garbage"), r"model\.safetensors: unreadable"),
        ("gpt2", lambda p: (p / "model.safetensors").unlink(), r"no weights"),
        ("gpt2", lambda p: (p / "config.json").write_text("{not json"), r"config\.json: invalid JSON"),
        (
            "gpt2",
            lambda p: (p / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})),
            r"GPT2LMHeadModel.*not a sequence-classification",
        ),
        ("value_head", lambda p: (p / "reward_manifest.json").write_text("[]"), r"reward_manifest\.json"),
        ("value_head", lambda p: shutil.rmtree(p / "base"), r"base model 'base' not found"),
        ("value_head", lambda p: (p / "value_head.safetensors").unlink(), r"value_head\.safetensors.*missing"),
        ("peft", lambda p: (p / "adapter_config.json").write_text("{}"), r"base_model_name_or_path"),
    ],
)
def test_bad_checkpoints_fail_fast_naming_the_problem(
    source: str | None,
    mutate: Callable[[Path], None],
    message: str,
    checkpoints: dict[str, Path],
    tmp_path: Path,
) -> None:
    if source is None:
        path = tmp_path / "missing"
    elif source == "empty":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path = _broken(checkpoints[source], tmp_path / source, mutate)
    with pytest.raises(CheckpointError, match=message) as err:
        load_reward_model(path, dtype="float32", device="cpu")
    assert str(path) in str(err.value)


def test_value_head_delta_must_fit_the_base(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = _broken(checkpoints["value_head"], tmp_path / "vh", lambda p: None)
    save_file({"not.a.layer": torch.zeros(2)}, str(path / "backbone_delta.safetensors"))
    with pytest.raises(CheckpointError, match="do not belong to the base model"):
        load_reward_model(path, dtype="float32", device="cpu")


def test_fingerprint_covers_what_changes_a_reward_and_nothing_else(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    copy = shutil.copytree(checkpoints["gpt2"], tmp_path / "gpt2")

    def fp(**options: object) -> str:
        return load_reward_model(copy, device="cpu", **options).info.model_fingerprint  # type: ignore[arg-type]

    first = fp(dtype="float32")
    assert fp(dtype="bfloat16") != first  # another dtype moves rewards
    (copy / "checkpoint-500").mkdir()  # what a trainer leaves beside the weights is never read
    (copy / "checkpoint-500" / "model.safetensors").write_bytes(b"snapshot")
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth"):
        (copy / name).write_bytes(b"state")
    assert fp(dtype="float32") == first


def test_a_base_model_counts_by_content_not_by_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = shutil.copytree(
        checkpoints["value_head"], tmp_path / "value_head", ignore=shutil.ignore_patterns("base")
    )
    base = shutil.copytree(checkpoints["value_head"] / "base", tmp_path / "elsewhere" / "base")
    manifest = json.loads((checkpoint / "reward_manifest.json").read_text())
    (checkpoint / "reward_manifest.json").write_text(json.dumps({**manifest, "base_model": str(base)}))
    first = load_reward_model(checkpoint, dtype="float32", device="cpu").info.model_fingerprint
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))  # the same name, other numbers
    assert load_reward_model(checkpoint, dtype="float32", device="cpu").info.model_fingerprint != first


@pytest.mark.parametrize(("stated", "served"), [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_auto_dtype_serves_what_the_checkpoint_was_trained_in(
    stated: str, served: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """`REWARD_DTYPE=auto` on a CPU with bfloat16 units used to pick bfloat16 for a float32-trained model."""
    copy = shutil.copytree(checkpoints["gpt2"], tmp_path / "gpt2")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "dtype": stated}))
    info = load_reward_model(copy, dtype="auto", device="cpu").info
    assert info.dtype == served and stated in info.dtype_source
    asked = load_reward_model(copy, dtype="float32", device="cpu").info
    assert asked.dtype == "float32" and asked.dtype_source == "REWARD_DTYPE"


def test_a_timing_names_the_cpu_and_any_kernel_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model cards and benchmarks state the CPU; a run held to AVX2 kernels on a newer CPU says so beside its flags."""
    from app.model.cpu import cpu_description

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = cpu_description()
    assert "CPUs (" in plain and "capped" not in plain
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu_description() == plain[:-1] + ", kernels capped by ATEN_CPU_CAPABILITY=avx2)"
