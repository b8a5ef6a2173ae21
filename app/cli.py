"""`reward-server` command line. Building the parser imports argparse, pydantic and the train settings only (no
torch, transformers or server), so `--help` and a usage error answer in a fraction of a second; each command imports
what it runs."""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# ---- argument types: a bad value is argparse's one-line error naming the flag ---------------------------------


def device(text: str) -> str:
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, mps, cuda or cuda:N")
    return text


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


positive_int.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"


def problems(exc: ValidationError, prog: str, flag: Callable[[str], str]) -> str:
    """pydantic's report as one line per problem, each naming the flag (or variable) at fault."""
    lines = [f"{prog}: error: {flag(str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg']}" for e in exc.errors()]
    return "\n".join(lines)


# ---- commands ----------------------------------------------------------------------------------------------------


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
        flags = {"model_path": "--model", "host": "--host", "port": "--port"}
        raise SystemExit(problems(exc, "reward-server serve", lambda f: flags.get(f, f"REWARD_{f.upper()}"))) from exc
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
    failure = app.state.startup.failure
    if not server.started or failure is not None:  # the port was taken, or loading failed (e.g. a broken checkpoint)
        print(f"reward-server serve: start-up failed: {failure or 'the server did not start'}", file=sys.stderr)
        return 3  # as `uvicorn.run` exits
    return 1 if any(worker.failure is not None for worker in app.state.workers) else 0  # 1: a model thread died


def _train(args: argparse.Namespace) -> int:
    from app.model.checkpoint import CheckpointError
    from app.training.config import TrainConfig
    from app.training.data import DataError
    from app.training.ensemble import train_ensemble
    from app.training.train import Trainer

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}  # flags given (the rest: absent)
    try:
        config = TrainConfig(**values)
    except ValidationError as exc:
        print(problems(exc, "reward-server train", lambda f: "--" + f.replace("_", "-")), file=sys.stderr)
        return 2
    command = shlex.join(["reward-server", *args.argv])
    try:
        if config.prm:
            from app.training.prm import PRMTrainer

            summary = PRMTrainer(config).train(command)
        else:
            summary = train_ensemble(config, command) if config.ensemble > 1 else Trainer(config).train(command)
    except (DataError, CheckpointError) as exc:
        raise SystemExit(f"reward-server train: {exc}") from exc
    best = summary.get("best_epochs", summary.get("best_epoch"))
    print(f"wrote {config.output} (best epoch {best}, {summary['train_seconds']:.0f} s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from app.model.reference import write as write_reference
    from app.training.data import DataError, load_pairs
    from app.training.evaluate import write_report
    from app.training.sources import checkpoint_report, server_report

    if args.url is not None and args.max_length is not None:
        raise SystemExit("reward-server eval: --max-length applies to --model (a server reads with its own)")
    if args.prm:
        from app.training.prm import prm_report

        if args.model is None:
            raise SystemExit("reward-server eval: --prm scores a checkpoint (--model)")
        try:
            print(prm_report(args.model, args.data, args.out, args.dtype, args.device, args.limit))
        except DataError as exc:
            raise SystemExit(f"reward-server eval: {exc}") from exc
        return 0
    try:
        pairs = load_pairs(args.data)
    except DataError as exc:
        raise SystemExit(f"reward-server eval: {exc}") from exc
    if args.limit:
        pairs = pairs[: args.limit]
    if args.model is not None:
        report, reference = checkpoint_report(pairs, args.model, args.dtype, args.device, args.max_length)
        title = f"{args.model} on {args.data.name}"
        if reference is not None:  # --out CHECKPOINT/eval: stored with the model, the monitor reads it
            write_reference(reference, args.out)
    else:
        from app.clients import RewardClient

        with RewardClient(args.url, api_key=args.api_key, timeout=600, model=args.name) as client:
            report = server_report(pairs, client.score, client.info, args.name)
        title = f"{args.url} ({args.name or 'its default model'}) on {args.data.name}"
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


# ---- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-server", description="Serve, train and evaluate reward models.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP",
        description="Serve a checkpoint over HTTP. Every setting also reads a REWARD_* environment variable "
        "(app/settings.py); a flag overrides it.",
    )
    serve.add_argument("--model", type=Path, help="Checkpoint directory to serve (REWARD_MODEL_PATH).")
    serve.add_argument(
        "--host", help="Address to bind; 0.0.0.0 accepts other machines (REWARD_HOST, default 127.0.0.1)."
    )
    serve.add_argument("--port", type=int, help="TCP port to listen on (REWARD_PORT, default 8000).")
    serve.add_argument(
        "--ray",
        action="store_true",
        help="Serve on Ray Serve instead of one process: replicas and resources from the REWARD_RAY_* settings.",
    )
    serve.set_defaults(func=_serve)

    train = sub.add_parser(
        "train",
        help="train a value-head reward model on preference pairs",
        description="Train a value-head reward model on JSONL preference pairs (Bradley-Terry loss). The defaults "
        "are the recipe that trained models/default.",
        usage="%(prog)s --base-model BASE_MODEL --train-file TRAIN_FILE --output OUTPUT [options]",
    )
    from app.training.flags import add_train_arguments

    add_train_arguments(train)
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help="accuracy, calibration and length bias on preference pairs",
        description="Score preference pairs with a checkpoint or a running server: accuracy, calibration and "
        "length bias, written as report.json, summary.md and plots.",
    )
    required = ev.add_argument_group("required: --data, --out and one of --model or --url")
    source = required.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="Checkpoint directory, scored in this process.")
    source.add_argument("--url", help="A running reward-server, scored over HTTP: the same numbers as --model.")
    required.add_argument("--data", type=Path, required=True, help="JSONL preference pairs to score.")
    required.add_argument("--out", type=Path, required=True, help="Directory for report.json, summary.md, *.png.")
    settings = ev.add_argument_group("settings")  # after the required ones in --help
    settings.add_argument("--api-key", help="--url: the bearer key, when the server was started with one.")
    settings.add_argument(
        "--prm",
        action="store_true",
        help="A process reward model on step-labelled solutions: step accuracy, F1, "
        "ProcessBench first-error accuracy (report.json, summary.md).",
    )
    settings.add_argument("--name", help="--url: the served model, ensemble or alias to score (default: its default).")
    settings.add_argument(
        "--limit", type=positive_int, help="Score only the first N pairs: a quick look before a full run."
    )
    settings.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="--model: compute dtype; auto is the one the checkpoint states, since another moves its rewards "
        "(default: auto).",
    )
    settings.add_argument(
        "--device",
        type=device,
        default="auto",
        help="--model: auto (CUDA when present, else CPU), cpu, mps, cuda or cuda:N (default: auto).",
    )
    settings.add_argument(
        "--max-length",
        type=positive_int,
        help="--model: read items with this many tokens instead of the checkpoint's recipe (default: the recipe's).",
    )
    ev.set_defaults(func=_eval)

    ex = sub.add_parser(
        "export",
        help="write a checkpoint as a plain transformers model",
        description="Write any loadable checkpoint as a merged AutoModelForSequenceClassification (num_labels=1) "
        "with its tokenizer, for tools that load plain transformers models.",
    )
    required = ex.add_argument_group("required")
    required.add_argument("--model", type=Path, required=True, help="Checkpoint directory, any supported format.")
    required.add_argument("--out", type=Path, required=True, help="Directory to write the merged model to.")
    ex.set_defaults(func=_export)

    from app.bench import run as bench  # its flags only: the benchmark's own imports wait for `run`

    be = sub.add_parser(
        "bench",
        help="throughput and latency beside the engine limit and peers",
        description="Throughput and latency under trainer traffic, beside the engine limit, a naive server and "
        "LitServe (app/bench/run.py describes the workloads and modes).",
    )
    bench.add_arguments(be).set_defaults(func=bench.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # no command: the overview, not just "the following arguments are required: COMMAND"
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
