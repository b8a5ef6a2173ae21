#!/usr/bin/env bash
# Regenerates the install locks (exact versions with hashes) from pyproject.toml: `bash deploy/lock.sh`.
#   deploy/lock/serve.txt     the service: core + backbones (the CPU image; a serving install outside Docker)
#   deploy/lock/ray.txt       the service on Ray Serve: + ray
#   deploy/lock/dev.txt       everything .ci/install installs: + test, train, bench, ray
#   deploy/lock/cuda.txt      torch for NVIDIA GPUs as PyPI publishes it, and the CUDA wheels it pulls (the GPU image,
#                             installed --no-deps before serve.txt or ray.txt)
#   deploy/lock/trainers.txt  the trainers' code the tests run (see below)
# torch is pinned per target, outside the CPU locks: .ci/install and the CPU image install torch==$TORCH+cpu with
# --no-deps, and the lock brings what it needs (sympy, networkx, jinja2, ...) with hashes. The CPU locks are resolved
# against that CPU build (torch==$TORCH+cpu: a local copy of its wheel where pip's find-links has one, as on our
# machines, else PyTorch's CPU index), whose metadata names no CUDA package. PyPI's Linux torch is the CUDA build: its
# metadata requires triton, cuda-toolkit (nvidia-cublas, -cudnn, -nccl, ... ~4 GB) and cuda-bindings, and
# `--no-emit-package torch` drops only torch's own line, not those: resolved against PyPI's torch, they had landed in
# every lock. cuda.txt is exactly that difference: PyPI's torch==$TORCH resolved from PyPI alone (its metadata; no
# wheel is downloaded), less every package the CPU build needs too, which the CPU locks already pin.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0  # also in .ci/install and the Dockerfile (tests/test_install.py holds them equal)
python=${LOCK_PYTHON:-.venv/bin/python}  # any Python with pip (uv is installed into it when missing)
[ -x "$python" ] || python=python3
"$python" -m uv --version >/dev/null 2>&1 || "$python" -m pip install -q uv
sources=()  # a local package mirror configured for pip (as on our machines) is read by uv too
for url in $("$python" -m pip config get global.extra-index-url 2>/dev/null || true); do
  sources+=(--extra-index-url "$url")
done
cpu_wheel=
for links in $("$python" -m pip config get global.find-links 2>/dev/null || true); do
  sources+=(--find-links "$links")
  ls "$links"/torch-"$TORCH"+cpu-*.whl >/dev/null 2>&1 && cpu_wheel=$links
done
# else torch from https://download.pytorch.org/whl/cpu, where the CPU image installs it from
[ -n "$cpu_wheel" ] || sources+=(--torch-backend cpu)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==$TORCH+cpu" >"$work/cpu-torch.txt"
platform=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match --no-header)
lock() {  # an existing lock's pins are kept where they still satisfy pyproject.toml (uv reads -o as preferences)
  local out=$1; shift
  "$python" -m uv pip compile pyproject.toml "$@" -c "$work/cpu-torch.txt" --no-emit-package torch --generate-hashes \
    "${platform[@]}" "${sources[@]}" --quiet -o "$out"
}
lock deploy/lock/serve.txt --extra backbones
lock deploy/lock/ray.txt --extra backbones --extra ray
lock deploy/lock/dev.txt --extra test --extra backbones --extra train --extra bench --extra ray
if grep -nE '^(nvidia-|cuda-|triton==)' deploy/lock/{serve,ray,dev}.txt; then
  echo "deploy/lock.sh: a CUDA package is in a CPU lock (above)" >&2
  exit 1
fi

# deploy/lock/cuda.txt: the CPU build's own dependencies are left out (the CPU lock installed with it pins them).
echo "torch==$TORCH" >"$work/torch.in"
"$python" -m uv pip compile "$work/torch.in" -c "$work/cpu-torch.txt" --no-emit-package torch "${platform[@]}" \
  "${sources[@]}" --quiet -o "$work/cpu-needs.txt"
no_emit=()
for name in $(sed -nE 's/^([A-Za-z0-9_.-]+)==.*/\1/p' "$work/cpu-needs.txt"); do no_emit+=(--no-emit-package "$name"); done
"$python" -m uv pip compile "$work/torch.in" --generate-hashes "${platform[@]}" --default-index https://pypi.org/simple \
  "${no_emit[@]}" --quiet -o deploy/lock/cuda.txt
sed -i "1i # bash deploy/lock.sh; PyPI's CUDA build of torch and the CUDA wheels it pulls, installed with --no-deps\\
# --require-hashes before serve.txt or ray.txt, which pin the rest (see the comment there)" deploy/lock/cuda.txt

# deploy/lock/trainers.txt: the trainers' own code the tests run against the server (verl's reward loop,
# OpenRLHF's reward fetcher, a TRL GRPOTrainer step), installed with --no-deps: their full dependency trees are GPU
# stacks (vLLM, DeepSpeed); these pins are what that code imports on top of the dev lock. Hashes of the files pip
# downloads for this machine.
trainers=(verl==0.9.1 openrlhf==0.11.2 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 tensordict==0.15.3
  pyvers==0.2.3 codetiming==1.4.0 cloudpickle==3.1.3 orjson==3.13.0
  trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0)
"$python" -m pip download -q --no-deps -d "$work/downloads" "${trainers[@]}"
{
  echo "# bash deploy/lock.sh; installed with --no-deps --require-hashes (see the comment there)"
  for pin in "${trainers[@]}"; do
    name=${pin%%==*}
    file=$(ls "$work/downloads" | grep -i "^${name//-/[-_]}-" | head -1)
    echo "$pin --hash=sha256:$(sha256sum "$work/downloads/$file" | cut -d' ' -f1)"
  done
} >deploy/lock/trainers.txt
