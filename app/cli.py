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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-server", description="Serve, train and evaluate reward models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP (settings also from REWARD_* variables)")
    serve.add_argument("--model", type=Path, help="checkpoint directory (REWARD_MODEL_PATH)")
    serve.add_argument("--host", help="bind address (REWARD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (REWARD_PORT, default 8000)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
