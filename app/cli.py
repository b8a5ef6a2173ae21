"""`reward-server` command line."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    pass


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.server.main import create_app
    from app.settings import Settings

    overrides = {
        k: v for k, v in {"model_path": args.model, "host": args.host, "port": args.port}.items() if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise SystemExit(f"invalid settings: {exc}") from exc
    from app.server.middleware import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if args.ray:
        from app.server.ray_serve import run

        return run(settings)
    from app.server.protocol import GuardedHttpTools

    # uvicorn's own loggers propagate to our handler; its access log is replaced by ours (with request ids)
    app = create_app(settings, on_model_death=lambda: setattr(server, "should_exit", True))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        http=GuardedHttpTools.bound_to(settings),  # header deadline and caps, connection cap
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,  # type: ignore[arg-type]
    )

    class GracefulServer(uvicorn.Server):
        """SIGTERM/SIGINT drain gracefully, then exit 0: stock uvicorn re-raises the signal afterwards, so the
        process would die 'by signal' and an orchestrator would count a clean shutdown as a crash."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = GracefulServer(config)
    server.run()
    if not server.started:
        return 3  # start-up failed (e.g. a broken checkpoint), as `uvicorn.run` exits
    worker = getattr(app.state, "worker", None)
    return 1 if worker is not None and worker.failure is not None else 0  # 1: the model thread died


def _train(args: argparse.Namespace) -> int:
    from app.model.checkpoint import CheckpointError
    from app.training.config import TrainConfig
    from app.training.data import DataError
    from app.training.train import Trainer

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    try:
        config = TrainConfig(**values)
        summary = Trainer(config).train(command=shlex.join(["reward-server", *args.argv]))
    except (ValidationError, DataError, CheckpointError) as exc:
        raise SystemExit(f"reward-server train: {exc}") from exc
    print(f"wrote {config.output} (best epoch {summary['best_epoch']}, {summary['train_seconds']:.0f} s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from app.training.data import DataError, load_pairs
    from app.training.evaluate import evaluate, write_report

    if (args.model is None) == (args.url is None):
        raise SystemExit("reward-server eval: give exactly one of --model PATH or --url URL")
    if args.url is not None and args.max_length is not None:
        raise SystemExit("reward-server eval: --max-length applies to --model (a server reads with its own)")
    try:
        pairs = load_pairs(args.data)
    except DataError as exc:
        raise SystemExit(f"reward-server eval: {exc}") from exc
    if args.limit:
        pairs = pairs[: args.limit]
    if args.model is not None:
        from app.engine.offline import score_offline, served_fingerprint
        from app.model.loading import load_reward_model

        model = load_reward_model(args.model, dtype=args.dtype, device=args.device, max_length=args.max_length)
        report = evaluate(pairs, lambda inputs: score_offline(model, inputs), progress=True)
        report["max_length"] = model.max_length
        report["fingerprint"], report["versions"] = served_fingerprint(model), model.info.versions
        report["model_fingerprint"], report["kernels"] = model.info.model_fingerprint, model.prepared.model_dump()
        title = f"{args.model} on {args.data.name}"
    else:
        from app.clients import RewardClient

        with RewardClient(args.url, api_key=args.api_key, timeout=600) as client:
            score = lambda inputs: client.score([(x.prompt, x.response) for x in inputs]).rewards  # noqa: E731
            report = evaluate(pairs, score, progress=True)
            info = client.info()
            report["max_length"] = info["max_length"]
            report["fingerprint"], report["versions"] = info["fingerprint"], info["versions"]
            report["model_fingerprint"], report["kernels"] = info["model_fingerprint"], info["kernels"]
        title = f"{args.url} on {args.data.name}"
    report["data"] = str(args.data)
    write_report(report, args.out, title)
    print((args.out / "summary.md").read_text())
    return 0


def _export(args: argparse.Namespace) -> int:
    from app.model.checkpoint import CheckpointError
    from app.model.export import ExportError, export_seq_cls

    try:
        out = export_seq_cls(args.model, args.out)
    except (ExportError, CheckpointError) as exc:
        raise SystemExit(f"reward-server export: {exc}") from exc
    print(
        f"wrote {out}: AutoModelForSequenceClassification (num_labels=1) + tokenizer + {out / 'reward_manifest.json'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-server", description="Serve, train and evaluate reward models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP (settings also from REWARD_* variables)")
    serve.add_argument("--model", type=Path, help="checkpoint directory (REWARD_MODEL_PATH)")
    serve.add_argument("--host", help="bind address (REWARD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (REWARD_PORT, default 8000)")
    serve.add_argument(
        "--ray", action="store_true", help="serve on Ray Serve: replicas and resources from the REWARD_RAY_* settings"
    )
    serve.set_defaults(func=_serve)

    from app.training.config import TrainConfig

    train = sub.add_parser("train", help="train a value-head reward model on JSONL preference pairs")
    for name, field in TrainConfig.model_fields.items():
        default = "" if field.is_required() else f" (default {field.default})"
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{field.description or name}{default}")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="accuracy, calibration and length bias on preference pairs; report + plots")
    ev.add_argument("--model", type=Path, help="checkpoint directory, scored in-process")
    ev.add_argument("--url", help="a running server, scored over HTTP (same numbers)")
    ev.add_argument("--api-key")
    ev.add_argument("--data", type=Path, required=True, help="JSONL preference pairs")
    ev.add_argument("--out", type=Path, required=True, help="directory for report.json, summary.md, *.png")
    ev.add_argument("--limit", type=int, help="only the first N pairs")
    ev.add_argument("--dtype", default="auto", help="in-process dtype (default: what the checkpoint states)")
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--max-length", type=int, help="in-process: read items with this context instead of the checkpoint's recipe"
    )
    ev.set_defaults(func=_eval)

    ex = sub.add_parser("export", help="write any loadable checkpoint as a merged AutoModelForSequenceClassification")
    ex.add_argument("--model", type=Path, required=True, help="checkpoint directory (any supported format)")
    ex.add_argument("--out", type=Path, required=True, help="output directory")
    ex.set_defaults(func=_export)

    from app.bench import run as bench

    be = sub.add_parser("bench", help="throughput and latency beside the engine limit, a naive server and LitServe")
    bench.add_arguments(be).set_defaults(func=bench.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
