"""What a loaded model is (`ModelInfo`, from loading) and how it computes (`Kernels`, measured at start-up): the
model's part of `/info` and of the fingerprint."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.model.checkpoint import Normalization
from app.model.steps import StepRule


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), frozen=True)

    model_path: str
    format: str
    architecture: str
    model_type: str
    pooling: str
    head_index: int | None = Field(description="the head's output that is the reward (none: a weighted sum)")
    attributes: list[str] | None = Field(None, description="a multi-attribute head's outputs, by name")
    steps: StepRule | None = Field(
        None, description="a process reward model's step rule: how steps are joined and read, its default aggregate"
    )
    base_model: str | None
    num_parameters: int
    dtype: str
    dtype_source: str = Field(description="why this dtype: REWARD_DTYPE, or what the checkpoint states")
    versions: dict[str, str] = Field(description="torch and transformers major.minor, part of the fingerprint")
    device: str
    device_map: str | None = Field(description="the device map the backbone was spread with, if any")
    max_length: int
    recipe: dict[str, Any]
    checkpoint_normalization: Normalization | None = Field(description="the mean/std the checkpoint stores")
    monitor_reference: dict[str, Any] | None = Field(
        None, description="its eval set's reward distribution and length correlation, the monitor's reference"
    )
    model_fingerprint: str = Field(description="the loaded model's part of it: files, base, recipe, dtype, device")


class Kernels(BaseModel):
    """How the model runs a plan, decided by measurement on the thread that runs it (`RewardModel.prepare`)."""

    model_config = ConfigDict(frozen=True)

    layout: Literal["packed", "padded"] = Field(
        description="packed: one row, no padding, each prompt once (SDPA decoders); padded: a row per item"
    )
    batch_invariant: bool = Field(description="each reward is bitwise a function of its item alone, whatever its batch")
    linears: dict[str, str] = Field(description="per linear shape and dtype, the calls its rows run in")
    attention_calls: int = Field(description="per-item attention calls the probe's packed forward made (0: padded)")
    threads: int | None = Field(description="CPU threads of the model thread (a reduction's order follows them)")
    note: str = Field("", description="why a layout or invariance was not available")

    def describe(self) -> str:
        """One phrase for the start-up log."""
        how = "batch-invariant" if self.batch_invariant else "stock kernels"
        where = f"{self.threads} CPU threads" if self.threads else "GPU"
        return f"{self.layout}, {how}, {where}" + (f" ({self.note})" if self.note else "")

    def fingerprint_part(self) -> dict[str, Any]:
        """What moves a reward: the layout, and for invariant kernels their shapes and threads."""
        if not self.batch_invariant:
            return {"layout": self.layout, "invariant": False}
        return {"layout": self.layout, "linears": self.linears, "threads": self.threads}
