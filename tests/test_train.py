"""Training on tiny models: it learns, it writes a checkpoint the server loads, and both read sequences the same."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaModel

from app.cli import main
from app.model.checkpoint import CheckpointError
from app.model.loading import load_reward_model
from app.training.config import TrainConfig
from app.training.data import DataError, PreferencePair, load_pairs
from app.training.evaluate import evaluate_margins, fit_temperature
from app.training.features import FeatureStore, PairFeatures, pair_features
from app.training.hacking import length_figures
from app.training.optim import WeightAverage, length_gap, length_weights, preference_loss
from app.training.train import Trainer, trainable_prefixes
from tests import tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    tokenizer = tiny.byte_level_tokenizer(bos=True, chat=True)
    LlamaModel(tiny.llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_pairs(path: Path, n: int) -> Path:
    rows = [
        {
            "prompt": f"Human: What is the capital of France? ({i})",
            "chosen": "The capital of France is Paris.",
            "rejected": "I'm sorry, I can't help with that request.",
            "dataset": "toy",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def served_margins(checkpoint: Path, trainer: Trainer, pairs: list[PreferencePair]) -> list[float]:
    """r_chosen - r_rejected from a full forward of the saved checkpoint, as the server computes them."""
    served = load_reward_model(checkpoint, dtype="float32", device="cpu")
    return [a - b for a, b in [served.score([c, r]) for c, r in trainer.encode(pairs)]]


def test_load_pairs_reports_the_line(tmp_path: Path) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing 'rejected'"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_pairs(path)
    conv = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        "margin": 1,
    }
    path.write_text(json.dumps(conv) + "\n")
    pair = load_pairs(path)[0]
    assert pair.prompt == [{"role": "user", "content": "q"}] and (pair.chosen, pair.rejected, pair.margin) == (
        "a",
        "b",
        1.0,
    )


def test_top_k_prefixes_cover_top_blocks_and_final_norm(base: Path) -> None:
    model = LlamaModel.from_pretrained(base)
    assert trainable_prefixes(model, "top_k", 1) == ["layers.1.", "norm.", "rotary_emb."]
    assert trainable_prefixes(model, "head", 1) == []


@pytest.mark.parametrize("mode", ["top_k", "lora"])
def test_training_learns_and_the_server_reads_the_checkpoint_identically(base: Path, tmp_path: Path, mode: str) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 32)
    dev = write_pairs(tmp_path / "dev.jsonl", 8)
    config = TrainConfig(
        base_model=str(base),
        train_file=train,
        dev_file=dev,
        output=tmp_path / "out",
        mode=mode,
        top_k=1,
        epochs=3,
        batch_pairs=8,
        lr=1e-2,
        head_lr=1e-2,
        max_length=64,
        seed=0,
    )
    trainer = Trainer(config)
    summary = trainer.train()
    assert summary["history"][-1]["dev_accuracy"] == 1.0
    served = load_reward_model(config.output, dtype="float32", device="cpu")
    manifest = json.loads((config.output / "reward_manifest.json").read_text())
    assert manifest["recipe"] == trainer.recipe.model_dump()
    assert (manifest["adapter"] == "adapter") == (mode == "lora")
    pairs = load_pairs(dev)
    encoded = trainer.encode(pairs)
    assert [e.input_ids for e in served.encoder.encode_batch(list(pairs[0].inputs()))] == [
        encoded[0][0].input_ids,
        encoded[0][1].input_ids,
    ]
    rewards = [served.score([c, r]) for c, r in encoded]
    assert all(a > b for a, b in rewards)
    kept = summary["history"][summary["best_epoch"] - 1]  # type: ignore[index,operator]
    assert kept["dev_chosen_shorter_accuracy"] == 1.0  # every chosen reply is the shorter one: the other half is empty
    assert "dev_chosen_longer_accuracy" not in kept
    figures = length_figures(pairs, [a for a, _ in rewards], [b for _, b in rewards])
    assert kept["dev_reward_length_correlation"] == pytest.approx(figures["reward_length_correlation"], abs=1e-4)
    assert figures["reward_length_correlation"] < -0.5  # the shorter reply wins, so reward falls with length
    assert summary["temperature"] is not None and manifest["extra"]["temperature"] == summary["temperature"]


def test_feature_cached_training_reads_exactly_what_the_server_reads(base: Path, tmp_path: Path) -> None:
    """Top-k training on cached bottom-block states (shared prompt run once) gives the rewards a full forward of the
    saved checkpoint gives."""
    train = write_pairs(tmp_path / "train.jsonl", 16)
    config = TrainConfig(
        base_model=str(base),
        train_file=train,
        output=tmp_path / "cached",
        mode="top_k",
        top_k=1,
        epochs=1,
        batch_pairs=4,
        lr=1e-2,
        head_lr=1e-2,
        max_length=64,
        calibrate=False,
        average_from=None,  # the live weights are the saved ones: no mean, no rounding
        delta_dtype="float32",
    )
    trainer = Trainer(config)
    assert trainer.split is not None
    trainer.train()
    pairs = load_pairs(train)[:6]
    cached = trainer.margins(trainer.examples(pairs, "check"))
    full = served_margins(config.output, trainer, pairs)
    assert cached == pytest.approx(full, abs=1e-4)
    assert all(ex.prefix.shape[0] > 5 for ex in trainer.examples(pairs, "check"))  # the prompt is shared


def test_feature_cache_on_disk_is_reused_across_runs_and_changes_nothing(base: Path, tmp_path: Path) -> None:
    """A sweep's second run reads the first run's features back: same rewards, and the card still states the
    from-scratch time (reused compute seconds added back)."""
    train = write_pairs(tmp_path / "train.jsonl", 8)
    store = tmp_path / "features"

    def run(name: str, pairs: int) -> tuple[Trainer, dict[str, object]]:
        config = TrainConfig(
            base_model=str(base),
            train_file=train,
            output=tmp_path / name,
            top_k=1,
            epochs=1,
            batch_pairs=4,
            max_length=64,
            calibrate=False,
            max_train_pairs=pairs,
            feature_cache=store,
        )
        trainer = Trainer(config)
        return trainer, trainer.train()

    first, _ = run("first", 6)
    assert first.store is not None and first.store.reused_seconds == 0.0
    assert len(list(store.rglob("*.safetensors"))) == 6 and not list(store.rglob("*.partial"))
    second, second_summary = run("second", 8)  # a superset: 6 entries read back, 2 computed
    assert second.store is not None and second.store.reused_seconds > 0.0
    assert len(list(store.rglob("*.safetensors"))) == 8
    assert second_summary["train_seconds"] == pytest.approx(
        float(second_summary["wall_seconds"]) + second.store.reused_seconds  # type: ignore[arg-type]
    )
    assert "reused from `--feature-cache`" in (tmp_path / "second" / "README.md").read_text()
    pairs = load_pairs(train)
    fresh = [pair_features(first.split.bottom, [pair])[0] for pair in first.encode(pairs)]  # type: ignore[union-attr]
    stored = second.examples(pairs, "check")
    for a, b in zip(fresh, stored, strict=True):  # alone vs batched with others: the same up to rounding
        assert isinstance(b, PairFeatures)
        for part in ("prefix", "chosen", "rejected"):
            assert torch.allclose(getattr(a, part), getattr(b, part), atol=1e-5)
    changed = copy.deepcopy(first.split.bottom)  # type: ignore[union-attr]
    with torch.no_grad():
        changed.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert FeatureStore(store, changed).fingerprint != second.store.fingerprint  # other weights never read these
    bf16 = Trainer(first.config.model_copy(update={"bf16": True, "output": tmp_path / "bf16"}))
    assert bf16.store is not None and bf16.store.fingerprint != second.store.fingerprint  # other numbers, other keys
    cast = bf16.examples(pairs, "bf16")  # the frozen blocks under the same bf16 autocast as the trained ones
    assert bf16.store.reused_seconds == 0.0
    for a, b in zip(stored, cast, strict=True):
        assert isinstance(a, PairFeatures) and isinstance(b, PairFeatures)
        assert not torch.equal(a.chosen, b.chosen) and torch.allclose(a.chosen, b.chosen, atol=0.1, rtol=0.05)


def test_train_cli_writes_a_checkpoint(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 8)
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                "--base-model",
                str(base),
                "--train-file",
                str(train),
                "--output",
                str(out),
                "--epochs",
                "1",
                "--mode",
                "head",
                "--max-length",
                "64",
            ]
        )
        == 0
    )
    assert load_reward_model(out, dtype="float32", device="cpu").info.format == "value_head"
    card = (out / "README.md").read_text()
    assert f"reward-server train --base-model {base}" in card and "Training time, measured" in card
    assert "| corr(reward, length) |" in card
    with pytest.raises(SystemExit) as exited:  # argparse's one line, naming the flag
        main(["train", "--base-model", str(base), "--train-file", str(train), "--output", str(out), "--epochs", "0"])
    assert exited.value.code == 2 and "argument --epochs: must be >= 1" in capsys.readouterr().err


def test_eval_metrics_and_temperature() -> None:
    result = evaluate_margins([2.0, 1.0, -1.0, 0.5])
    assert result.accuracy == 0.75 and result.mean_margin == pytest.approx(0.625)
    overconfident = [8.0] * 70 + [-8.0] * 30  # 70% right, but claims ~100%
    t = fit_temperature(overconfident)
    assert t > 5
    assert evaluate_margins([m / t for m in overconfident]).ece < evaluate_margins(overconfident).ece


def test_preference_loss_with_label_smoothing_stops_at_a_finite_margin() -> None:
    diffs = torch.linspace(-6, 6, 1201)
    zero = torch.zeros(1)

    def loss(d: torch.Tensor, **options: float) -> float:
        return float(preference_loss(d.view(1), zero, zero, **options))

    plain = [loss(d) for d in diffs]
    assert plain == pytest.approx([float(-torch.nn.functional.logsigmoid(d)) for d in diffs])
    assert all(a > b for a, b in itertools.pairwise(plain))  # always wants a wider margin
    smoothed = [loss(d, label_smoothing=0.1) for d in diffs]
    best = float(diffs[min(range(len(diffs)), key=smoothed.__getitem__)])
    assert best == pytest.approx(torch.log(torch.tensor(0.9 / 0.1)).item(), abs=0.01)  # target 0.9 reached there
    required = float(preference_loss(torch.full((1,), 3.0), zero, torch.full((1,), 2.0), label_smoothing=0.1))
    assert required == pytest.approx(loss(torch.tensor(1.0), label_smoothing=0.1))  # a pair's margin is subtracted
    both = float(preference_loss(torch.ones(1), torch.ones(1), zero, center_coef=0.5))
    assert both == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.zeros(()))) + 0.5 * 4)


def test_weight_average_is_the_mean_past_its_start_and_swaps_back() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([p], start=2)
    with average.applied():  # nothing averaged yet: the live weights
        assert torch.equal(p, torch.zeros(3))
    for value in [1.0, 2.0, 4.0, 8.0]:
        with torch.no_grad():
            p.fill_(value)
        average.update()
    assert torch.allclose(average.mean[0], torch.full((3,), 6.0))  # steps 3 and 4 only
    with pytest.raises(RuntimeError), average.applied():
        assert torch.allclose(p, torch.full((3,), 6.0))
        raise RuntimeError("evaluation failed")
    assert torch.equal(p, torch.full((3,), 8.0))  # the live weights are back, even after an error


def test_averaged_training_evaluates_and_saves_the_mean(base: Path, tmp_path: Path) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 16)
    config = TrainConfig(
        base_model=str(base),
        train_file=train,
        dev_file=train,
        output=tmp_path / "swa",
        top_k=1,
        epochs=1,
        batch_pairs=4,
        lr=1e-3,
        head_lr=1e-3,
        lr_schedule="constant",
        max_length=64,
        calibrate=False,
        average_from=0.25,
    )
    trainer = Trainer(config)
    summary = trainer.train()
    pairs = load_pairs(train)
    saved = served_margins(config.output, trainer, pairs)
    live = trainer.margins(trainer.examples(pairs, "check"))  # the last step's weights, still in the module
    recorded = summary["history"][-1]["dev_log_loss"]  # type: ignore[index]
    assert evaluate_margins(saved).log_loss == pytest.approx(recorded, abs=1e-5)  # dev was scored on the mean
    assert live != pytest.approx(saved, abs=1e-3)  # so the checkpoint holds the mean, not the last step


def test_the_length_term_takes_what_length_alone_predicts_out_of_the_served_reward(base: Path, tmp_path: Path) -> None:
    """Pairs whose only difference is length: the fitted length weight explains them, so the training logit (which
    has the term) is right from the first step, while the served reward (which has none) is what dev scored."""
    row = {"chosen": "yes " * 12, "rejected": "yes " * 3, "dataset": "toy"}
    rows = [{"prompt": f"Say it. ({i})", **row} for i in range(24)]
    data = tmp_path / "length.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for term in (0.0, 1.0):
        config = TrainConfig(
            base_model=str(base),
            train_file=data,
            dev_file=data,
            output=tmp_path / f"term-{term}",
            top_k=1,
            epochs=2,
            batch_pairs=8,
            lr=1e-2,
            head_lr=5e-2,
            max_length=64,
            calibrate=False,
            length_term=term,
            center_coef=0.0,  # the losses compared are the Bradley-Terry term alone
        )
        trainer = Trainer(config)
        summary = trainer.train()
        pairs = load_pairs(data)
        kept = summary["history"][summary["best_epoch"] - 1]  # type: ignore[index,operator]
        served = evaluate_margins(served_margins(config.output, trainer, pairs))
        assert served.log_loss == pytest.approx(kept["dev_log_loss"], rel=1e-3)
        losses[term] = summary["history"][0]["train_loss"]  # type: ignore[index]
        assert (summary["length_weights"] is not None) == bool(term)
    assert summary["length_weights"]["toy"] > 5  # type: ignore[index]  # every chosen reply is the longer one
    assert losses[1.0] < 0.1 * losses[0.0]


def test_length_weights_fit_each_datasets_length_preference() -> None:
    longer = [PreferencePair("p", "x" * 40, "x" * 20, dataset="long") for _ in range(6)]
    longer += [PreferencePair("p", "x" * 20, "x" * 40, dataset="long") for _ in range(2)]  # 3 of 4 prefer longer
    shorter = [PreferencePair("p", "x" * 10, "x" * 30, dataset="short") for _ in range(3)]
    shorter += [PreferencePair("p", "x" * 30, "x" * 10, dataset="short")]
    weights = length_weights(longer + shorter)
    gap = length_gap(longer[0])  # the fit puts P(longer) = 3/4 where the data does
    assert 1 / (1 + math.exp(-weights["long"] * gap)) == pytest.approx(0.75, abs=1e-4)
    assert weights["short"] < 0 and 1 / (1 + math.exp(weights["short"] * length_gap(shorter[0]))) < 0.5


def test_a_shallower_model_keeps_the_bases_first_blocks_and_serves_as_trained(tmp_path: Path) -> None:
    """`layers=2` on a 3-block base: training caches block 1, trains block 2 + norm + head, drops block 3; the
    checkpoint records the depth, the server rebuilds exactly that model, and a depth the base lacks fails fast."""
    base = tmp_path / "base3"
    torch.manual_seed(0)
    tokenizer = tiny.byte_level_tokenizer(bos=True, chat=True)
    config3 = tiny.llama_config(tokenizer)
    config3.num_hidden_layers = 3
    LlamaModel(config3).save_pretrained(base)
    tokenizer.save_pretrained(base)
    train = write_pairs(tmp_path / "train.jsonl", 16)
    config = TrainConfig(
        base_model=str(base),
        train_file=train,
        output=tmp_path / "out",
        top_k=1,
        layers=2,
        epochs=1,
        batch_pairs=4,
        lr=1e-2,
        head_lr=1e-2,
        max_length=64,
        calibrate=False,
        average_from=None,  # the live weights are the saved ones: no mean, no rounding
        delta_dtype="float32",
    )
    trainer = Trainer(config)
    assert trainer.split is not None and len(trainer.split.bottom.layers) == 1 and len(trainer.split.top.layers) == 1
    trainer.train()
    manifest = json.loads((config.output / "reward_manifest.json").read_text())
    assert manifest["num_layers"] == 2
    assert "first 2 blocks (the rest dropped); trained: top 1 blocks" in (config.output / "README.md").read_text()
    assert all(
        ".1." in k or not k.startswith("layers.") for k in load_file(config.output / "backbone_delta.safetensors")
    )
    served = load_reward_model(config.output, dtype="float32", device="cpu")
    assert served.module.backbone.config.num_hidden_layers == 2 and len(served.module.backbone.layers) == 2
    pairs = load_pairs(train)[:6]
    full = served_margins(config.output, trainer, pairs)
    assert trainer.margins(trainer.examples(pairs, "check")) == pytest.approx(full, abs=1e-4)
    with pytest.raises(CheckpointError, match=r"num_layers 4, but the base .* has 3 blocks"):
        Trainer(config.model_copy(update={"layers": 4}))
    manifest["num_layers"] = 5
    (config.output / "reward_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="num_layers 5"):
        load_reward_model(config.output, dtype="float32", device="cpu")


def test_a_bf16_delta_halves_the_checkpoint_and_dev_measures_the_rounded_weights(base: Path, tmp_path: Path) -> None:
    """`delta_dtype=bfloat16` stores the trained block in bf16; the served model scores as the trainer does with its
    weights rounded (what dev is measured on), not as with the unrounded ones."""
    train = write_pairs(tmp_path / "train.jsonl", 16)
    config = TrainConfig(
        base_model=str(base),
        train_file=train,
        output=tmp_path / "out",
        top_k=1,
        epochs=1,
        batch_pairs=4,
        lr=1e-2,
        head_lr=1e-2,
        max_length=64,
        calibrate=False,
        delta_dtype="bfloat16",
        average_from=None,  # the live weights, rounded, are the saved ones
    )
    trainer = Trainer(config)
    trainer.train()
    delta = load_file(config.output / "backbone_delta.safetensors")
    assert delta and all(v.dtype == torch.bfloat16 for v in delta.values())
    assert "+ head, stored in bfloat16." in (config.output / "README.md").read_text()
    pairs = load_pairs(train)[:6]
    examples = trainer.examples(pairs, "check")
    live = trainer.margins(examples)
    with trainer.stored():
        rounded = trainer.margins(examples)
    assert trainer.margins(examples) == live  # the live weights come back after the block
    assert max(abs(a - b) for a, b in zip(live, rounded, strict=True)) > 1e-4
    assert served_margins(config.output, trainer, pairs) == pytest.approx(rounded, abs=1e-5)
