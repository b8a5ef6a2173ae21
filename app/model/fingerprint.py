"""The fingerprint: equal fingerprints give equal rewards. Every scoring response carries it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from app.model import backbones
from app.model.recipe import ScoringRecipe


def fingerprint(path: Path, recipe: ScoringRecipe, base_identity: str | None, head_index: int) -> str:
    """sha256 over every file that affects scoring (weights, configs, tokenizer), the recipe and the base."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if file.suffix.lower() in {".md", ".png", ".jpg", ".svg"} or rel.startswith(("eval/", ".")):
            continue
        digest.update(rel.encode() + b"\0" + backbones.sha256_file(file).encode() + b"\0")
    digest.update(recipe.model_dump_json().encode())
    digest.update(f"base={base_identity};head_index={head_index}".encode())
    return digest.hexdigest()[:16]
