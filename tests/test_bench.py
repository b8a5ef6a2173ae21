"""`reward-server bench`, short: every mode and workload runs over real processes and reports (no timing asserted)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from app.bench import run as bench
from tests.conftest import free_port

WORDS = [
    *["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "near"],
    *["the", "river", "bank", "hello", "world", "sea", "wind", "stars"],
]
rng = random.Random(0)


def sentence(n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.mark.slow  # every mode and workload, over real server processes
def test_bench_runs_every_mode_and_workload(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": sentence(150), "chosen": sentence(30), "rejected": sentence(40)} for _ in range(6)]
    rows += [{"prompt": sentence(20), "chosen": sentence(8), "rejected": sentence(5)} for _ in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bench"
    args = ["--model", str(checkpoints["value_head"]), "--data", str(data), "--dtype", "float32"]
    args += ["--prompts", "2", "--group", "3", "--clients", "4", "--idle-items", "2", "--out", str(out)]
    modes = list(bench.MODES)
    args += ["--modes", ",".join(modes)]
    assert bench.main([*args, "--port", str(free_port())]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    every = {(m, w) for m in modes for w in bench.WORKLOADS}
    assert {(r["mode"], r["workload"]) for r in results} == every - bench.SKIPPED
    for r in results:
        assert r["items"] == (2 if r["workload"] == "idle" else 6) and r["items/s"] > 0
        # idle over HTTP: each request paired with its item's forward, run in-process just before it
        paired = r["workload"] == "idle" and r["mode"] != "engine"
        assert len(r["forwards"]) == (2 if paired else 0) and all(f > 0 for f in r["forwards"])
        ours = paired and r["mode"] not in ("naive", "litserve")  # the peers report no forward time
        assert len(r["served_forwards"]) == (2 if ours else 0) and all(f > 0 for f in r["served_forwards"])
    server = {r["workload"]: r for r in results if r["mode"] == "server"}
    shared = server["shared"]
    assert shared["real_tokens"] < shared["item_tokens"]  # the prompt ran once per group, not once per item
    assert server["storm"]["latencies"] and len(server["storm"]["latencies"]) == 6
    limit = json.loads(out.with_suffix(".json").read_text())["roofline"]
    assert limit["roofline_tokens_per_s"] == max(limit["matmul_flops"]) / limit["flops_per_token"]
    for r in results:  # useful work over the probe's rate
        assert abs(r["roofline"] - r["tokens/s"] / limit["roofline_tokens_per_s"]) < 1e-9 * r["tokens/s"]
    table = out.with_suffix(".md").read_text()
    assert "| tokens/s | roofline |" in table and "GFLOP/s (probes " in table
    assert "the model's linears at 512 rows: " in table
    assert {k.split("x", 1)[0] for k in limit["linear_flops"]} == {"512"}  # the rows the invariant forward uses
    assert "server / engine" in table and "server / litserve" in table
    hostile = {r["mode"]: r for r in results if r["workload"] == "hostile"}
    assert sum(hostile["server"]["hostile_statuses"].values()) > 0  # the hostile client ran beside the storm
    assert {int(s) for s in hostile["server"]["hostile_statuses"]} <= {413, 422}  # each refused, none a 500
    assert "| hostile | server: hostile / storm (hostile bodies answered " in table
    assert "| idle | server p50 of (latency - the item's forward) |" in table
    assert "| idle | server p50 of (latency - its own forward) |" in table
    monitored = {r["mode"]: r["monitor_seconds"] for r in results if r["workload"] == "storm"}
    assert monitored["server"] > 0 and monitored["server-unmonitored"] == 0  # its own time, counted by the server
    assert "| storm | server: the monitor's own time / wall time |" in table


def test_flops_per_token_counts_every_linear_weight_of_the_backbone(load: Any) -> None:
    """2 FLOPs per weight a token passes through: from the config, attention and MLP projections of every layer."""
    from app.bench.roofline import flops_per_token, linear_rates, matmul_probe

    model = load("llama")
    c = model.module.backbone.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    assert flops_per_token(model.module.backbone) == 2 * c.num_hidden_layers * per_layer
    assert matmul_probe(torch.float32, size=64, repeats=2) > 0
    rates = linear_rates(model.module.backbone, 16, torch.float32, repeats=1)
    h, i = c.hidden_size, c.intermediate_size
    assert set(rates) == {(h, h), (h, kv), (h, i), (i, h)} and all(r > 0 for r in rates.values())
    gpt2 = load("gpt2").module.backbone  # its linears are transposed `Conv1D`s: qkv, attention out, MLP up and down
    g = gpt2.config
    assert flops_per_token(gpt2) == 2 * g.n_layer * (3 * g.n_embd**2 + g.n_embd**2 + 8 * g.n_embd**2)
    assert set(linear_rates(gpt2, 16, torch.float32, repeats=1)) == {
        (g.n_embd, 3 * g.n_embd),
        (g.n_embd, g.n_embd),
        (g.n_embd, 4 * g.n_embd),
        (4 * g.n_embd, g.n_embd),
    }


def test_without_a_data_file_the_bench_generates_pairs_of_realistic_length() -> None:
    """A user's clone has no ../shared: the workloads are drawn from the repository's example pairs, and from generated
    pairs where even those are absent, instead of failing."""
    from app.bench.workloads import synthetic_pairs

    pairs = synthetic_pairs(seed=0)
    assert pairs == synthetic_pairs(seed=0) and len(pairs) == 48
    words = sorted(len(p.prompt.split()) for p in pairs if isinstance(p.prompt, str))
    assert 30 <= words[len(words) // 2] <= 80 and words[-1] > 2 * words[len(words) // 2]  # a median and a long tail
    assert bench.EXAMPLES.exists()
    assert bench.build_parser().parse_args([]).data == (bench.DEV if bench.DEV.exists() else bench.EXAMPLES)


def test_the_invariance_check_measures_each_way_of_batching(load: Any) -> None:
    """What `bench --gpu-check` reports: in float32 every way of batching is within float noise of alone, and the
    batch-invariant kernels are exact."""
    from app.bench.gpu import invariance
    from app.model.recipe import ScoringInput

    model = load("llama")
    inputs = [ScoringInput(sentence(n), sentence(m)) for n in (3, 40) for m in (1, 9, 30)]
    try:
        diffs = invariance(model, inputs)
    finally:
        model.prepare()  # it leaves the (shared) model on the stock kernels
    assert set(diffs) == {"batch-invariant", "stock kernels"}
    assert all(0 <= d <= 1e-4 for d in diffs.values())
    assert diffs["batch-invariant"] == 0.0


def test_the_hacking_run_reports_each_phase_and_repetition_at_its_onset(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import ROOT

    data = ROOT / "examples/data/dev.jsonl"
    assert (
        bench.main(["--hacking", "--model", str(checkpoints["value_head"]), "--data", str(data), "--dtype", "float32"])
        == 0
    )
    table = capsys.readouterr().out
    for phase in ("clean", "longer", "hedging", "repetition", "other domain"):
        assert f"| {phase} |" in table
    rows = {line.split(" |")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "repetition: +0" in rows["repetition"] or "repetition: +1" in rows["repetition"]
    assert "boilerplate: +0" in rows["hedging"] or "boilerplate: +1" in rows["hedging"]
    assert "0 of 200 steps answered with one (false-alarm rate 0.0%)" in table


def test_the_prm_workload_runs_this_server_and_the_naive_one(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """`--prm`: the checkpoint read at every step; 8 problems x 8 solutions of 6-12 steps on both servers."""
    from tests.conftest import ROOT

    out = tmp_path / "prm"
    args = [
        "--prm",
        str(tmp_path),
        "--model",
        str(checkpoints["value_head"]),
        "--data",
        str(ROOT / "examples/data/train.jsonl"),
    ]
    assert bench.main([*args, "--dtype", "float32", "--port", str(free_port()), "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert {(r["mode"], r["workload"]) for r in results} == {("server", "prm"), ("naive", "prm")}
    assert all(r["items"] == 64 and r["items/s"] > 0 for r in results)
    assert "| prm | server / naive |" in out.with_suffix(".md").read_text()
