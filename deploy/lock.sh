#!/usr/bin/env bash
# Regenerates the install locks (exact versions with hashes) from pyproject.toml: `bash deploy/lock.sh`.
#   deploy/lock/serve.txt  the service (the CPU and GPU images)      deploy/lock/ray.txt  the service on Ray Serve
#   deploy/lock/dev.txt    everything .ci/install installs (tests, tools, bench, Ray)
# torch is left out of every lock: it is pinned per target (the CPU wheel in .ci/install, a CUDA wheel in the gpu image).
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python=python3
"$python" -m uv --version >/dev/null 2>&1 || "$python" -m pip install -q uv
sources=()  # a local package mirror configured for pip (as on our machines) is read by uv too
for url in $("$python" -m pip config get global.extra-index-url 2>/dev/null || true); do
  sources+=(--extra-index-url "$url")
done
links=$("$python" -m pip config get global.find-links 2>/dev/null || true)
[ -n "$links" ] && sources+=(--find-links "$links")
lock() {
  local out=$1; shift
  "$python" -m uv pip compile pyproject.toml "$@" --generate-hashes --python-version 3.11 --no-emit-package torch \
    --index-strategy unsafe-best-match --no-header "${sources[@]}" --quiet -o "$out"
}
lock deploy/lock/serve.txt --extra backbones
lock deploy/lock/ray.txt --extra backbones --extra ray
lock deploy/lock/dev.txt --extra test --extra backbones --extra tools --extra bench --extra ray
