"""`REWARD_MODELS_FILE`: the models, ensembles and aliases one server scores with (TOML, or YAML by suffix). Read
once at start-up; a problem fails it with one line naming the file and the entry."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.model.ensemble import Aggregate
from app.settings import Settings

MODEL_KNOBS = frozenset(
    {"device", "device_map", "dtype", "max_length", "head_index", "attribute_weights", "steps", "trust_remote_code"}
    | {"normalize", "reward_mean"}
    | {"reward_std", "max_batch_tokens", "max_batch_size", "batch_invariant", "block_rows"}
)  # what a models file may set per model; the rest (limits, server, cache) is the process's
PER_MEMBER = {"model_path", "served_model_name", "normalize", "reward_mean", "reward_std"}  # a shared base: not shared


class ModelEntry(BaseModel):
    """`[models.NAME]`: a checkpoint and any of `MODEL_KNOBS`, over the process's settings."""

    model_config = ConfigDict(extra="allow")
    path: Path

    @model_validator(mode="after")
    def _known_knobs(self) -> ModelEntry:
        if unknown := sorted(set(self.model_extra or {}) - MODEL_KNOBS):
            raise ValueError(f"unknown settings {unknown}; a model may set {sorted(MODEL_KNOBS)}")
        return self

    def settings(self, name: str, base: Settings) -> Settings:
        """What model `name` is served with: the process's settings, with this path and these knobs."""
        overrides = {**(self.model_extra or {}), "model_path": self.path, "served_model_name": name}
        try:
            return Settings.model_validate({**base.model_dump(), **overrides})
        except ValidationError as exc:
            raise ValueError(f"{exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None


class EnsembleEntry(Aggregate):
    """`[ensembles.NAME]`: registered members and how their rewards aggregate."""

    members: list[str] = Field(min_length=2)


class ModelsFile(BaseModel):
    """What `REWARD_MODELS_FILE` holds: `default`, `[models.*]`, `[ensembles.*]`, `[aliases]` (name -> model)."""

    model_config = ConfigDict(extra="forbid")
    default: str | None = None
    share_bases: bool = Field(
        True, description="an ensemble's members that share a base run it once per item (`app.model.family`)"
    )
    models: dict[str, ModelEntry] = Field(min_length=1)
    ensembles: dict[str, EnsembleEntry] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_resolve(self) -> ModelsFile:
        taken = [*self.models, *self.ensembles, *self.aliases]
        if len(set(taken)) < len(taken):
            raise ValueError("a name is used twice among models, ensembles and aliases")
        for name, ensemble in self.ensembles.items():
            if missing := [m for m in ensemble.members if m not in self.models]:
                raise ValueError(f"ensembles.{name}: members {missing} are not in [models]")
        for alias, target in self.aliases.items():
            if target not in self.models and target not in self.ensembles:
                raise ValueError(f"aliases.{alias}: {target!r} is neither a model nor an ensemble")
        if self.default is not None and self.default not in taken:
            raise ValueError(f"default {self.default!r} is not a model, ensemble or alias in this file")
        return self

    @classmethod
    def read(cls, path: Path) -> ModelsFile:
        """Raises ValueError naming the file and the problem (start-up fails fast with it)."""
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw: Any = yaml.safe_load(text)
            else:
                raw = tomllib.loads(text)
            spec = cls.model_validate(raw)
        except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
            problem = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {_msg(e)}" if e["loc"] else _msg(e) for e in exc.errors())
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            raise ValueError(f"{path}: {problem}") from None
        for entry in spec.models.values():  # relative to the file, as a file written beside its models says them
            entry.path = path.parent / entry.path.expanduser()
        return spec

    def groups(self, base: Settings) -> list[list[str]]:
        """The models, each alone or with those it may share a base with: members of one ensemble (or of ensembles
        that overlap) loaded with the same settings (normalization aside: it is each member's own). Whether their
        checkpoints do share a base is the loader's to find (`load_shared_base`)."""
        group = {name: [name] for name in self.models}
        if self.share_bases:
            loading = {n: self.settings_of(n, base).model_dump(exclude=PER_MEMBER) for n in self.models}
            for ensemble in self.ensembles.values():
                for name in ensemble.members[1:]:
                    first = ensemble.members[0]
                    if loading[name] == loading[first] and group[name] is not group[first]:
                        group[first] += group[name]
                        for moved in group[name]:
                            group[moved] = group[first]
        return list({id(g): g for g in group.values()}.values())

    def settings_of(self, name: str, base: Settings) -> Settings:
        try:
            return self.models[name].settings(name, base)
        except ValueError as exc:
            raise ValueError(f"models.{name}: {exc}") from None


def _msg(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")
