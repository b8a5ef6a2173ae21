"""`examples/data`: the example pairs load, are what their README says, and its commands run on them."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaModel

from app.bench.run import build_parser as bench_parser
from app.bench.workloads import build_workloads
from app.cli import main
from app.model.loading import load_reward_model
from app.model.reward_model import RewardModel
from app.training.data import PreferencePair, load_pairs
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
README = (DATA / "README.md").read_text()
DATASETS = {"examples-helpful", "examples-harmless"}


def readme_command(verb: str) -> list[str]:
    """The README's `reward-server VERB ...` command (backslash continuations joined), as CLI arguments."""
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    lines = block.group(1).replace("\\\n", " ").splitlines()
    found = [shlex.split(line) for line in lines if line.startswith(f"reward-server {verb} ")]
    assert len(found) == 1, verb
    return found[0][1:]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def replace(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(name) + 1] = value
    return out


def prompt_key(pair: PreferencePair) -> str:
    assert isinstance(pair.prompt, str)
    return " ".join(pair.prompt.lower().split())


def test_the_example_files_are_what_their_readme_says() -> None:
    train, dev = load_pairs(DATA / "train.jsonl"), load_pairs(DATA / "dev.jsonl")
    assert f"`train.jsonl` ({len(train)} pairs) and `dev.jsonl` ({len(dev)} pairs" in README
    assert (len(train), len(dev)) == (48, 16)
    for pairs in (train, dev):
        assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)
        assert {p.dataset for p in pairs} == DATASETS
        assert len({prompt_key(p) for p in pairs}) == len(pairs)  # one pair per prompt
        shorter = sum(len(p.chosen) < len(p.rejected) for p in pairs)
        assert f"{shorter} of {len(pairs)}" in README  # the length claim, and it is near half
        assert 0.35 < shorter / len(pairs) < 0.65
        turns = sum(prompt_key(p).startswith("human:") for p in pairs)
        assert turns >= 3 and all(
            "\n\nAssistant: " in p.prompt and p.prompt.rstrip().count("Human:") >= 2  # type: ignore[union-attr]
            for p in pairs
            if prompt_key(p).startswith("human:")
        )
    assert not {prompt_key(p) for p in train} & {prompt_key(p) for p in dev}
    for name in ("train.jsonl", "dev.jsonl"):  # exactly the format the README shows: these keys, nothing else
        rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
        assert all(set(row) == {"prompt", "chosen", "rejected", "dataset"} for row in rows)


def test_the_readmes_commands_name_the_example_files() -> None:
    train, ev, bench = readme_command("train"), readme_command("eval"), readme_command("bench")
    assert option(train, "--train-file") == "examples/data/train.jsonl"
    assert option(train, "--dev-file") == option(ev, "--data") == option(bench, "--data") == "examples/data/dev.jsonl"
    assert option(bench, "--model") == option(train, "--output")  # bench reads the model train wrote
    args = bench_parser().parse_args(bench[1:])  # the bench flags exist, and its workloads fit 16 pairs
    assert args.prompts <= 16 and args.group <= 32


def test_the_bench_workloads_build_from_the_example_pairs(load: Callable[..., RewardModel]) -> None:
    args = bench_parser().parse_args(readme_command("bench")[1:])
    workloads = build_workloads(
        load("llama"), ROOT / args.data, args.prompts, args.group, args.clients, args.idle_items, args.seed
    )
    dev = load_pairs(DATA / "dev.jsonl")
    replies = {r for p in dev for r in (p.chosen, p.rejected)}
    grpo = workloads["grpo"].items
    assert len(grpo) == args.prompts * args.group and all(x.response in replies for x in grpo)
    assert len(workloads["idle"].requests) == args.idle_items


def test_the_readmes_train_command_writes_a_checkpoint_that_loads(tmp_path: Path) -> None:
    """The command as written, on a tiny 4-block base in place of SmolLM2 (the flags, the files, the checkpoint)."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    tokenizer = tiny.byte_level_tokenizer(bos=True, chat=True)
    config = tiny.llama_config(tokenizer)
    config.num_hidden_layers = 4
    LlamaModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    args = readme_command("train")
    assert option(args, "--base-model") == "smollm2-135m-instruct"
    args = replace(args, "--base-model", str(base))
    args = replace(args, "--output", str(tmp_path / "example"))
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    assert main(args) == 0
    model = load_reward_model(tmp_path / "example", dtype="float32", device="cpu")
    assert model.info.format == "value_head" and model.max_length == int(option(args, "--max-length"))
    summary = json.loads((tmp_path / "example" / "train_summary.json").read_text())
    assert len(summary["history"]) == int(option(args, "--epochs"))
    assert 0 <= summary["history"][0]["dev_accuracy"] <= 1


@pytest.mark.slow
def test_the_readmes_train_command_runs_on_the_real_backbone(tmp_path: Path) -> None:
    """As written, SmolLM2 included (about 35 s on 2 cores once the backbone is built)."""
    args = replace(readme_command("train"), "--output", str(tmp_path / "example"))
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    assert main(args) == 0
    model = load_reward_model(tmp_path / "example", dtype="float32", device="cpu")
    assert (model.info.base_model or "").startswith("smollm2-135m-instruct") and len(model.module.backbone.layers) == 4


@pytest.mark.slow
def test_the_readmes_eval_command_writes_a_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = replace(readme_command("eval"), "--out", str(tmp_path / "eval"))
    assert option(args, "--model") == "models/default"
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["overall"]["pairs"] == 16 and set(report["by_dataset"]) == DATASETS
    assert (tmp_path / "eval" / "summary.md").exists()
