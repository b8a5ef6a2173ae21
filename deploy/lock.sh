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
# deploy/lock/trainers.txt: the trainers' own code the tests run against the server (verl's reward loop,
# OpenRLHF's reward fetcher, a TRL GRPOTrainer step), installed with --no-deps: their full dependency trees are GPU
# stacks (vLLM, DeepSpeed); these pins are what that code imports on top of the dev lock. Hashes of the files pip
# downloads for this machine.
trainers=(verl==0.9.1 openrlhf==0.11.2 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 tensordict==0.15.3
  pyvers==0.2.3 codetiming==1.4.0 cloudpickle==3.1.3 orjson==3.13.0
  trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0)
downloads=$(mktemp -d)
"$python" -m pip download -q --no-deps -d "$downloads" "${trainers[@]}"
{
  echo "# bash deploy/lock.sh; installed with --no-deps --require-hashes (see the comment there)"
  for pin in "${trainers[@]}"; do
    name=${pin%%==*}
    file=$(ls "$downloads" | grep -i "^${name//-/[-_]}-" | head -1)
    echo "$pin --hash=sha256:$(sha256sum "$downloads/$file" | cut -d' ' -f1)"
  done
} >deploy/lock/trainers.txt
rm -rf "$downloads"
