"""`reward-server bench --startup DIR`: how long `reward-server serve` takes from launch to its port answering, to
`/ready` 200 and to a first reward: once with an empty cache (`REWARD_CACHE_DIR=DIR`, emptied first: the packaged
backbone is converted and the kernels measured) and then twice more on that cache, as a restart finds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTS = ("first (empty cache)", "second", "third")


def _start(model: Path, cache: Path, port: int, log: Path, timeout: float = 600) -> dict[str, float]:
    """Seconds from launch to the port's first answer, to /ready 200 and to a first /score answer."""
    env = {**os.environ, "REWARD_CACHE_DIR": str(cache), "REWARD_LOG_FORMAT": "text", "REWARD_PORT": str(port)}
    base = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--model", str(model)], env=env, stdout=out, stderr=out
        )
    times: dict[str, float] = {}
    try:
        while "ready" not in times:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
            if time.perf_counter() - began > timeout:
                raise RuntimeError(f"not ready after {timeout:.0f} s; see {log}")
            try:
                status = httpx.get(f"{base}/ready", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            times.setdefault("port", time.perf_counter() - began)
            if status == 200:
                times["ready"] = time.perf_counter() - began
            else:
                time.sleep(0.05)
        item = {"prompt": "What is the capital of France?", "response": "Paris."}
        httpx.post(f"{base}/score", json={"items": [item]}, timeout=60).raise_for_status()
        times["reward"] = time.perf_counter() - began
    finally:
        proc.terminate()
        proc.wait(60)
    return times


def report(model: Path, cache: Path, port: int) -> str:
    """Three starts of `model`, the first on an emptied `cache`; the table `bench --startup` prints."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    lines = [
        f"Start-up: `reward-server serve --model {model}`, REWARD_CACHE_DIR={cache}",
        "",
        "| start | port answers s | /ready 200 s | first reward s |",
        "|---|---|---|---|",
    ]
    for name in STARTS:
        t = _start(model, cache, port, cache / f"{name.split()[0]}.log")
        lines.append(f"| {name} | {t['port']:.1f} | {t['ready']:.1f} | {t['reward']:.1f} |")
    return "\n".join(lines) + "\n"
