"""Loading at scale: weights go straight into the serving dtype, never through a float32 host copy. A generated bf16
Llama (~130M parameters, ~260 MB) in every format we load, each measured in a fresh process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.bench.load import FORMATS, Generated, generate, measure
from tests import tiny

GB = 1024**3

pytestmark = pytest.mark.slow  # a ~260 MB model generated in four formats, each loaded in a fresh process


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Generated]:
    tokenizer = tiny.byte_level_tokenizer(bos=True, chat=True)
    return generate(tmp_path_factory.mktemp("generated"), tokenizer, hidden=1024, layers=10)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_loads_within_its_size_plus_a_fixed_overhead(generated: dict[str, Generated], fmt: str) -> None:
    g = generated[fmt]
    assert 0.2 * GB < g.bytes < 0.6 * GB
    peak = measure(g.path, "bfloat16", "cpu")["peak_rss_bytes"]
    assert peak <= 1.15 * g.bytes + 0.8 * GB, f"{fmt}: peak {peak / GB:.2f} GB for {g.bytes / GB:.2f} GB of weights"


def test_the_value_head_stays_float32_in_a_bf16_model(generated: dict[str, Generated]) -> None:
    from app.model.loading import load_reward_model

    model = load_reward_model(generated["value_head"].path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.module.backbone.parameters()} == {torch.bfloat16}
    assert next(model.module.head.parameters()).dtype == torch.float32
    assert Path(model.info.model_path) == generated["value_head"].path
