"""Property-based fuzz of every scoring route with hostile text and conversations (in-process): never a 5xx.

Text: lone surrogates, NUL and control characters, combining marks, right-to-left and bidi controls, emoji, very long
strings; conversations: any roles in any order, empty contents, system turns a template may refuse. The statuses seen
are printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.server.main import create_app
from tests.conftest import test_settings

HOSTILE = st.sampled_from(["\ud800", "\udfff", "\x00", "\u0301\u0301", "\u202e", "\u200f", "\ufeff", "🦜", "\n\n"])
TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(HOSTILE, st.text(max_size=8)), max_size=12).map("".join),
    st.integers(1_000, 200_001).map(lambda n: "a" * n),  # around the 200,000-character limit
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLE, "content": TEXT}), min_size=1, max_size=6)
ITEM = st.one_of(
    st.fixed_dictionaries({"prompt": TEXT, "response": TEXT}), st.fixed_dictionaries({"messages": MESSAGES})
)
PAIR = st.fixed_dictionaries({"prompt": TEXT, "response_a": TEXT, "response_b": TEXT})
GROUP = st.fixed_dictionaries({"messages": MESSAGES, "responses": st.lists(TEXT, min_size=1, max_size=3)})
LABELS = st.lists(st.recursive(TEXT, st.lists))  # OpenRLHF's free-form labels, nested
BODIES = st.one_of(
    st.tuples(st.just("/score"), st.fixed_dictionaries({"items": st.lists(ITEM, min_size=1, max_size=3)})),
    st.tuples(st.just("/compare"), st.fixed_dictionaries({"pairs": st.lists(PAIR, max_size=2)})),
    st.tuples(st.just("/rank"), st.fixed_dictionaries({"groups": st.lists(GROUP, max_size=2)})),
    st.tuples(st.just("/get_reward"), st.fixed_dictionaries({"query": st.lists(TEXT, max_size=3), "labels": LABELS})),
)


@pytest.fixture(scope="module")
def strict_checkpoint(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a template that refuses system turns and non-alternating roles, as some hub RMs do."""
    path = shutil.copytree(checkpoints["llama"], tmp_path_factory.mktemp("strict") / "llama")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def test_hostile_text_and_conversations_never_get_a_5xx(strict_checkpoint: Path) -> None:
    statuses: Counter[int] = Counter()
    with TestClient(create_app(test_settings(strict_checkpoint), wait=True)) as client:  # runs the lifespan

        @given(request=BODIES)
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(request: tuple[str, dict[str, Any]]) -> None:
            path, body = request
            content = json.dumps(body)  # ensure_ascii: a lone surrogate goes out as the escape a client would send
            r = client.post(path, content=content, headers={"content-type": "application/json"})
            statuses[r.status_code] += 1
            assert r.status_code < 500, (path, r.text[:500])

        check()
    print(f"fuzz statuses: {dict(sorted(statuses.items()))} over {sum(statuses.values())} requests")
    assert statuses[200] and statuses[422]  # both accepted and refused inputs were generated
