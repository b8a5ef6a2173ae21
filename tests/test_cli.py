"""The CLI explains itself: help for every flag, required flags and choices shown, argparse's one-line errors (never
a pydantic dump), train defaults that are the shipped model's recipe, and a parser that imports no torch."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from app.cli import build_parser, main
from app.training.config import TrainConfig
from tests.conftest import ROOT

COMMANDS = ("serve", "train", "eval", "export", "bench")
REQUIRED = "reward-server train: error: the following arguments are required: --base-model, --train-file, --output"
TRAIN = ["train", "--base-model", "m", "--train-file", "t.jsonl", "--output", "out"]


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal: one width, whatever runs the tests


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("serve", ["--model", "--host", "--port", "--ray", "REWARD_"]),
        (
            "train",
            [
                "required:\n  --base-model BASE_MODEL",
                "--mode {head,top_k,full,lora}",
                "--lr-schedule {linear,constant}",
                "--delta-dtype {float32,bfloat16}",
                "--bf16, --no-bf16",
                "--calibrate, --no-calibrate",
                "(default: 3)",
            ],
        ),
        ("eval", ["required: --data, --out and one of --model or --url", "--dtype {auto,float32,bfloat16,float16}"]),
        ("export", ["required:\n  --model MODEL", "--out OUT"]),
        ("bench", ["--dtype {auto,float32,bfloat16,float16}", "engine,server", "grpo,storm"]),
    ],
)
def test_help_shows_required_flags_and_choices(command: str, shown: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    missing = [s for s in shown if s not in out]
    assert not missing


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_a_sentence(command: str) -> None:
    """Not the field's name again (what a flag without a description used to show): words ending a sentence."""
    for action in subcommands()[command]._actions[1:]:  # after argparse's own -h
        text = action.help or ""
        assert len(text.split()) >= 5 and text.endswith((".", ")")), f"{command} {action.option_strings}: {text!r}"


def test_no_command_prints_one_line_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert code == 2 and err.startswith("usage: reward-server")
    for command in COMMANDS:  # its name and its help on one line
        assert re.search(rf"^ +{command} +\w.*$", err, re.MULTILINE), command


def test_train_without_arguments_is_one_line_naming_the_required_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["train"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1] == REQUIRED and len(lines) == 2  # the short usage, then the error
    assert "pydantic" not in err.lower() and "validation error" not in err.lower()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--label-smoothing", "0.5"], "argument --label-smoothing: must be < 0.5, got 0.5"),
        (["--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
        (["--bf16", "yes"], "unrecognized arguments: yes"),  # a boolean takes no value: --bf16 / --no-bf16
    ],
)
def test_a_bad_train_value_is_one_line_naming_its_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run([*TRAIN, *flags], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and message in lines[-1] and len(lines) == 2


def test_train_flags_parse_into_the_config_and_absent_ones_keep_its_defaults() -> None:
    args = build_parser().parse_args([*TRAIN, "--no-calibrate", "--bf16", "--average-from", "none", "--layers", "17"])
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}
    assert values["calibrate"] is False and values["bf16"] is True and values["average_from"] is None
    assert "top_k" not in values and "cache_features" not in values  # not given: TrainConfig decides
    config = TrainConfig(**values)
    assert (config.layers, config.top_k, config.cache_features, str(config.train_file)) == (17, 3, True, "t.jsonl")


def test_a_config_problem_argparse_cannot_see_is_one_line_per_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """Values that skip argparse's checks (a caller's namespace) still come back as lines naming flags."""
    args = build_parser().parse_args(TRAIN)
    args.top_k, args.warmup_ratio, args.argv = 0, 2.0, TRAIN
    assert args.func(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[2] for line in lines] == ["--top-k", "--warmup-ratio"]
    assert all(line.startswith("reward-server train: error: --") for line in lines)


def test_train_defaults_are_the_recipe_of_the_default_model() -> None:
    """Every setting not tied to a backbone, a run or its files is what trained models/default."""
    manifest = json.loads((ROOT / "models" / "default" / "reward_manifest.json").read_text())
    newer = {"ensemble": 1, "bootstrap": False, "prm": False, "step_tag": "\n"}  # added since: what it then ran
    recipe = {**newer, **manifest["extra"]["train_config"]}
    specific = {"base_model", "train_file", "dev_file", "output", "layers", "system_prompt", "seed", "feature_cache"}
    defaults = {name: field.default for name, field in TrainConfig.model_fields.items() if name not in specific}
    assert defaults == {name: recipe[name] for name in defaults}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--data", "d", "--out", "o"], "one of the arguments --model --url is required"),
        (["eval", "--data", "d", "--out", "o", "--model", "m", "--url", "u"], "not allowed with argument --model"),
        (["eval", "--data", "d", "--out", "o", "--model", "m", "--device", "gpu"], "argument --device: 'gpu'"),
        (["export", "--model", "m"], "the following arguments are required: --out"),
        (["bench", "--modes", "engine,fast"], "argument --modes: unknown fast"),
        (["bench", "--clients", "0"], "argument --clients: must be at least 1"),
    ],
)
def test_other_commands_reject_bad_arguments_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err.strip().splitlines()[-1]


def test_building_the_parser_imports_no_torch() -> None:
    """What keeps `--help` under a second: the parser loads none of the heavy stacks (measured ~0.25 s)."""
    heavy = ("torch", "transformers", "numpy", "fastapi", "uvicorn", "pydantic_settings", "app.model", "app.server")
    code = f"import sys, app.cli; app.cli.build_parser(); print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    shown = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "--base-model" in shown.stdout
