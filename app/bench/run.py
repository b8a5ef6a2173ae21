"""`reward-server bench`: throughput and latency under trainer traffic, beside the limit and the peers, in one run.

Workloads (items from a preference file, so lengths are real):
- `grpo`: one request of P prompts x G replies (TRL);
- `storm`: the same items as single-item requests from C concurrent clients (OpenRLHF, verl);
- `shared`: like `grpo`, with prompts about 4x longer than replies (what shared-prompt reuse is for);
- `idle`: one single-item request at a time (latency);
- `hostile`: the storm while a second client sends the bodies that stalled servers (`bench/hostile.py`); run on
  this service only: `naive` scored the 500,000 empty items (no answer within 120 s, the storm waiting behind them)
  and `litserve` stopped answering the storm (the run hung until its timeout), tiny model, 2-core Xeon.

Modes, on the same checkpoint and dtype:
- `engine`: the model forward over the workload's items, planned as the server plans them, no HTTP: the limit the
  server is measured against;
- `server`: this service over HTTP (`server-stock`: with REWARD_BATCH_INVARIANT=false, the stock linears whose bf16
  rewards move with the batch; `server-unmonitored`: with REWARD_MONITOR=false, what the reward-hacking monitor
  costs);
- `naive`: a minimal FastAPI server running one forward per request, padded to its longest item (OpenRLHF
  `serve_rm.py`);
- `litserve`: LitServe with its dynamic batching (max_batch_size 16, 10 ms), one padded forward per batch;
- `ray`: this service on Ray Serve, one replica holding every core (the Ray path's overhead); `ray-2`: two replicas
  splitting the cores (how throughput grows with replicas).
Servers run in their own processes on 127.0.0.1; only one runs at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from app.cli import DTYPES, device, positive_int

if TYPE_CHECKING:  # the benchmark's modules import torch: `run` imports them, so `--help` stays instant
    from app.bench.workloads import Result

MODES = ("engine", "server", "server-stock", "server-unmonitored", "naive", "litserve", "ray", "ray-2")
WORKLOADS = ("grpo", "storm", "shared", "idle", "hostile")
SKIPPED = {("naive", "hostile"), ("litserve", "hostile")}  # see the docstring
ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "../shared/data/preferences/dev.jsonl"  # the real pairs, beside the repository in development
EXAMPLES = ROOT / "examples/data/dev.jsonl"  # else the pairs the repository ships


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


def report(results: list[Result], header: str, roofline_tokens: float | None = None) -> str:
    """`roofline_tokens`: the items' own tokens per second that would do the matmul probe's FLOP/s (`roofline`)."""
    lines = [header, ""]
    by: dict[tuple[str, str], Result] = {}
    for r in results:  # a mode listed twice (`--modes a,b,b,a`: no order favours either) keeps its better run
        best = by.get((r.workload, r.mode))
        if best is None or r.items / r.seconds > best.items / best.seconds:
            by[r.workload, r.mode] = r
    for workload in dict.fromkeys(r.workload for r in results):
        rows = [by[workload, m].row(roofline_tokens) for m in MODES if (workload, m) in by]
        cols = list(rows[0])
        lines += [f"### {workload}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in rows]
        lines.append("")
    lines += ["### ratios (items/s)", "", "| workload | ratio | value |", "|---|---|---|"]
    pairs = [("server", other) for other in ("engine", "server-stock", "server-unmonitored", "naive", "litserve")]
    pairs += [(ray_mode, "server") for ray_mode in ("ray", "ray-2")]  # the Ray path against the single process
    for workload in dict.fromkeys(r.workload for r in results):
        for mode, other in pairs:
            if (workload, mode) in by and (workload, other) in by and workload != "idle":
                a, b = by[workload, mode], by[workload, other]
                lines.append(f"| {workload} | {mode} / {other} | {(a.items / a.seconds) / (b.items / b.seconds):.2f} |")
    for mode in MODES:  # what hostile bodies cost each server's real traffic
        if (hostile := by.get(("hostile", mode))) and (storm := by.get(("storm", mode))):
            ratio = (hostile.items / hostile.seconds) / (storm.items / storm.seconds)
            answered = ", ".join(f"{status}: {n}" for status, n in sorted(hostile.hostile_statuses.items()))
            lines.append(f"| hostile | {mode}: hostile / storm (hostile bodies answered {answered}) | {ratio:.2f} |")
    for r in by.values():
        if r.monitor_seconds:  # the monitor runs on the event loop: at most this share of the wall time is its cost
            share = r.monitor_seconds / r.seconds
            lines.append(f"| {r.workload} | {r.mode}: the monitor's own time / wall time | {share:.3%} |")
        if r.forwards:  # paired: each request against its item's forward run just before it
            extra = statistics.median(a - b for a, b in zip(r.latencies, r.forwards, strict=True))
            lines.append(f"| {r.workload} | {r.mode} p50 of (latency - the item's forward) | {1000 * extra:+.1f} ms |")
        if r.served_forwards:  # this service reports its forward time: the rest is HTTP, queueing, tokenizing
            extra = statistics.median(a - b for a, b in zip(r.latencies, r.served_forwards, strict=True))
            lines.append(f"| {r.workload} | {r.mode} p50 of (latency - its own forward) | {1000 * extra:+.1f} ms |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def comma_list(allowed: Sequence[str]) -> Callable[[str], str]:
    """A comma-separated subset of `allowed`, checked when parsed (one line naming the flag, not a KeyError later)."""

    def convert(text: str) -> str:
        if unknown := [x for x in text.split(",") if x not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {','.join(allowed)})")
        return text

    return convert


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("models/default"),
        help="Checkpoint directory to measure (default: %(default)s).",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=next((f for f in (DEV, EXAMPLES) if f.exists()), None),
        help="Preference pairs to draw items from, so lengths are real (default: ../shared/data/preferences/dev.jsonl "
        "beside the repository, else the repository's examples/data/dev.jsonl).",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="Compute dtype of every mode; auto: the checkpoint's (--load: bfloat16) (default: %(default)s).",
    )
    parser.add_argument(
        "--prompts", type=positive_int, default=8, help="grpo, shared: prompts per request (default: %(default)s)."
    )
    parser.add_argument(
        "--group", type=positive_int, default=8, help="grpo, shared: replies per prompt (default: %(default)s)."
    )
    parser.add_argument(
        "--clients",
        type=positive_int,
        default=32,
        help="storm, hostile: concurrent single-item clients (default: %(default)s).",
    )
    parser.add_argument(
        "--idle-items", type=positive_int, default=24, help="idle: requests sent one at a time (default: %(default)s)."
    )
    parser.add_argument(
        "--modes",
        type=comma_list(MODES),
        default=",".join(MODES),
        help="Comma-separated servers to measure, from %(default)s (default: all); a mode listed twice keeps its "
        "better run (a,b,b,a: the order favours neither).",
    )
    parser.add_argument(
        "--workloads",
        type=comma_list((*WORKLOADS, "prm")),
        default=",".join(WORKLOADS),
        help="Comma-separated traffic shapes, from %(default)s (default: all; `prm` with --prm).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=18321,
        help="First port for the servers; mode i uses port + i (default: %(default)s).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seeds which items each workload draws (default: %(default)s)."
    )
    parser.add_argument("--out", type=Path, help="Write the markdown table and raw results here (.md and .json).")
    parser.add_argument(
        "--load",
        type=Path,
        metavar="DIR",
        help="Measure loading instead: generate a random bf16 Llama in each format under DIR, load each in a fresh "
        "process (peak host RSS, time to ready); --dtype and --device apply.",
    )
    parser.add_argument(
        "--startup",
        type=Path,
        metavar="DIR",
        help="Measure start-up instead: launch `reward-server serve --model` three times, the first with DIR as an "
        "emptied REWARD_CACHE_DIR; seconds to the port answering, to /ready 200 and to a first reward.",
    )
    parser.add_argument(
        "--prm",
        type=Path,
        metavar="DIR",
        help="Measure a process reward model instead: --model read at every step (made under DIR; see bench/prm.py), "
        "the prm workload (8 problems x 8 solutions of 6-12 steps), this server vs the naive one unless --modes.",
    )
    parser.add_argument(
        "--ensemble",
        type=Path,
        metavar="DIR",
        help="Measure an ensemble instead: --members checkpoints made under DIR from --model (its trained blocks and "
        "head moved by seeded noise), scored as one shared-base model and as separate models; items/s side by side.",
    )
    parser.add_argument(
        "--hacking",
        action="store_true",
        help="Measure the reward-hacking monitor instead: a scripted policy drifting over 40 /rank steps (longer, "
        "hedging, repeating, another domain) and a clean run; which warnings fire, how soon after each onset.",
    )
    parser.add_argument(
        "--members", type=positive_int, default=4, help="--ensemble: how many members (default: %(default)s)."
    )
    parser.add_argument(
        "--gpu-check",
        type=Path,
        metavar="DIR",
        help="Every GPU check in one run (load, invariance, server vs naive) on a model generated under DIR; "
        "with --device (cuda) and --load-params.",
    )
    parser.add_argument(
        "--load-params",
        type=float,
        default=0.8e9,
        help="--load, --gpu-check: parameters of the generated model (default: %(default).1e).",
    )
    parser.add_argument(
        "--device",
        type=device,
        default="cpu",
        help="--load, --gpu-check: where to load: cpu, cuda or cuda:N (default: %(default)s).",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="reward-server bench", description=__doc__))


def run(args: argparse.Namespace) -> int:
    import torch

    from app.bench.roofline import PROBE_SIZE, flops_per_token, linear_rates, matmul_probe
    from app.bench.served import Served
    from app.bench.workloads import build_workloads, run_engine
    from app.model.cpu import cpu_description
    from app.model.invariant import FIXED_ROWS
    from app.model.loading import load_reward_model

    text = None
    if args.gpu_check is not None:
        from app.bench.gpu import gpu_check

        text = gpu_check(args.gpu_check, args.load_params, args.device, args.port)
    elif args.startup is not None:
        from app.bench.startup import report as startup_report

        text = startup_report(args.model, args.startup, args.port)
    elif args.hacking:
        from app.bench.hacking import report as hacking_report

        text = hacking_report(args.model, args.data, args.dtype, args.seed)
    elif args.prm is not None:
        from app.bench.prm import step_model

        args.model, args.workloads = step_model(args.model, args.prm), "prm"
        args.modes = "server,naive" if args.modes == ",".join(MODES) else args.modes
    elif args.ensemble is not None:
        from app.bench.ensemble import report as ensemble_report

        text = ensemble_report(args.model, args.ensemble, args.members, args.data, args.dtype)
    elif args.load is not None:
        from app.bench.load import report as load_report

        dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        text = load_report(args.load, args.load_params, dtype, args.device)
    if text is not None:
        print(f"{cpu_description()}, torch {torch.__version__}\n")
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".md").write_text(text)
        return 0
    model = load_reward_model(args.model, dtype=args.dtype)
    kernels = model.prepare()  # what the start-up probe chooses on this CPU (each server measures its own)
    probes = [matmul_probe(model.dtype)]  # before and after the modes: the roofline is the better of the two
    workloads = build_workloads(model, args.data, args.prompts, args.group, args.clients, args.idle_items, args.seed)
    if unknown := [w for w in args.workloads.split(",") if w not in workloads]:
        raise SystemExit(f"--workloads {','.join(unknown)}: the `prm` workload needs a process reward model (--prm)")
    chosen = [workloads[w] for w in args.workloads.split(",")]
    modes = args.modes.split(",")
    results: list[Result] = []
    if "engine" in modes:
        results += [run_engine(model, w) for w in chosen]
    for i, mode in enumerate(m for m in modes if m != "engine"):
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"reward-bench-{mode}.log"
        # a port per mode: a stopping server (Ray's proxy binds with SO_REUSEPORT) never answers for the next one
        with Served(mode, args.model, args.dtype, args.port + i, log) as served:
            results += [served.run(model, w) for w in chosen if (mode, w.name) not in SKIPPED]
        print(f"{mode}: done", file=sys.stderr)
    probes.append(matmul_probe(model.dtype))
    rows = FIXED_ROWS.get(model.device.type, FIXED_ROWS["cuda"])  # fixed blocks, where the probe allows no fewer rows
    linears = linear_rates(model.module.backbone, rows, model.dtype)
    per_token = flops_per_token(model.module.backbone)
    roofline_tokens = max(probes) / per_token
    source = args.data.name if args.data else "generated pairs (no --data)"
    header = (
        f"{args.model} ({model.info.architecture}, {model.info.dtype}, {model.info.device}); "
        f"{cpu_description()}, torch {torch.__version__} "
        f"{torch.get_num_threads()} threads; {args.prompts} prompts x {args.group} replies from {source}, "
        f"storm with {args.clients} clients; roofline: a {PROBE_SIZE}x{PROBE_SIZE} {model.info.dtype} matmul at "
        f"{max(probes) / 1e9:.0f} GFLOP/s (probes {', '.join(f'{p / 1e9:.0f}' for p in probes)}) / "
        f"{per_token / 1e6:.0f} MFLOP per token = {roofline_tokens:.0f} tokens/s; the model's linears at {rows} rows: "
        + ", ".join(f"{k}->{n} {r / 1e9:.0f}" for (k, n), r in linears.items())
        + f" GFLOP/s; kernels: {kernels.layout}, {'batch-invariant' if kernels.batch_invariant else 'stock'}, "
        + "; ".join(f"{shape}: {how}" for shape, how in kernels.linears.items())
    )
    text = report(results, header, roofline_tokens)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        raw = [{**asdict(r), **r.row(roofline_tokens)} for r in results]
        limit = {"matmul_flops": probes, "flops_per_token": per_token, "roofline_tokens_per_s": roofline_tokens}
        limit["linear_flops"] = {f"{rows}x{k}x{n}": r for (k, n), r in linears.items()}
        document = {"header": header, "roofline": limit, "results": raw}
        args.out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
