"""`reward-server` command line."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    overrides = {
        k: v for k, v in {"model_path": args.model, "host": args.host, "port": args.port}.items() if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise SystemExit(f"invalid settings: {exc}") from exc
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _train(args: argparse.Namespace) -> int:
    from app.ml.data import DataError
    from app.ml.train import TrainConfig, Trainer

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    try:
        config = TrainConfig(**values)
        summary = Trainer(config).train()
    except (ValidationError, DataError) as exc:
        raise SystemExit(f"reward-server train: {exc}") from exc
    print(f"wrote {config.output} (best epoch {summary['best_epoch']}, {summary['train_seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-server", description="Serve, train and evaluate reward models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP (settings also from REWARD_* variables)")
    serve.add_argument("--model", type=Path, help="checkpoint directory (REWARD_MODEL_PATH)")
    serve.add_argument("--host", help="bind address (REWARD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (REWARD_PORT, default 8000)")
    serve.set_defaults(func=_serve)

    from app.ml.train import TrainConfig

    train = sub.add_parser("train", help="train a value-head reward model on JSONL preference pairs")
    for name, field in TrainConfig.model_fields.items():
        default = "" if field.is_required() else f" (default {field.default})"
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{field.description or name}{default}")
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
