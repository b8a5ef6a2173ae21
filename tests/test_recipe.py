"""The scoring recipe: exact text, special tokens, truncation that keeps the end."""

from __future__ import annotations

import pytest

from app.model.conversations import parse_transcript, render_transcript
from app.model.recipe import RecipeEncoder, ScoringInput, ScoringRecipe
from tests import tiny

HH = "Human: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Spain?"


def encoder(template: str, *, bos: bool = True, chat: bool = True, **fields: object) -> RecipeEncoder:
    fields.setdefault("max_length", 256)
    tokenizer = tiny.wordpiece_tokenizer() if template == "text_pair" else tiny.byte_level_tokenizer(bos=bos, chat=chat)
    return RecipeEncoder(ScoringRecipe(template=template, **fields), tokenizer)  # type: ignore[arg-type]


def test_transcript_round_trip() -> None:
    messages = parse_transcript(HH)
    assert messages == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
    ]
    assert render_transcript(messages) == HH
    assert parse_transcript("What is HH?") is None


def test_chat_renders_transcript_as_conversation_with_reply_last() -> None:
    enc = encoder("chat", append_eos=True)
    text = enc.render(ScoringInput(HH, "Madrid."))
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\nMadrid.<|im_end|>"
    )
    ids = enc.encode(ScoringInput(HH, "Madrid.")).input_ids
    assert ids[-1] == enc.eos_id and ids[-2] != enc.eos_id  # EOS once, and last: the head reads it
    assert ids.count(enc.bos_id) == 4 and ids[1] != enc.bos_id  # the template's BOS only, never doubled


def test_a_reply_with_no_prompt_turn_encodes_with_nothing_to_share() -> None:
    """A conversation that is only the assistant's reply (found by the fuzzer: the chat template refuses an empty
    conversation, so its "prompt" cannot be rendered) is read as the template writes it, with no shared prefix."""
    enc = encoder("chat")
    encoded = enc.encode(ScoringInput([], "Hello"))
    assert encoded.prefix == 0 and enc.tokenizer.decode(encoded.input_ids) == "<|im_start|>assistant\nHello<|im_end|>\n"


def test_chat_messages_and_system_prompt() -> None:
    enc = encoder("chat", system_prompt="Be brief.")
    text = enc.render(ScoringInput([{"role": "user", "content": "Hi"}], "Hello"))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    own_system = enc.render(ScoringInput([{"role": "system", "content": "X"}, {"role": "user", "content": "Hi"}], "Y"))
    assert "Be brief." not in own_system


def test_concat_no_doubled_bos_and_eos_appended_once() -> None:
    enc = encoder("concat", separator="\n", append_eos=True, chat=False)
    plain = enc.encode(ScoringInput("Hello", "there"))
    with_bos = enc.encode(ScoringInput("<|im_start|>Hello", "there"))  # OpenRLHF-style text that keeps specials
    assert plain.input_ids[0] == enc.bos_id and plain.input_ids[1] != enc.bos_id
    assert with_bos.input_ids == plain.input_ids
    already = enc.encode(ScoringInput("Hello", "there<|im_end|>"))
    assert already.input_ids == plain.input_ids
    assert plain.input_ids.count(enc.eos_id) == 1


def test_gpt2_style_tokenizer_adds_no_bos() -> None:
    enc = encoder("concat", bos=False, chat=False)
    ids = enc.encode(ScoringInput("Hello", " there")).input_ids
    assert enc.tokenizer.decode(ids) == "Hello there"


def test_truncation_keeps_bos_and_the_end_and_reports_it() -> None:
    enc = encoder("concat", max_length=12, append_eos=True, chat=False)
    long_prompt = "The quick brown fox jumps over the lazy dog near the river bank. " * 5
    full = RecipeEncoder(enc.recipe.model_copy(update={"max_length": 10_000}), enc.tokenizer).encode(
        ScoringInput(long_prompt, "Paris.")
    )
    cut = enc.encode(ScoringInput(long_prompt, "Paris."))
    assert cut.truncated and not full.truncated
    assert len(cut) == 12
    assert cut.input_ids[0] == enc.bos_id  # BOS kept
    assert cut.input_ids[1:] == full.input_ids[-11:]  # the end (reply + EOS) kept, the prompt cut from the left
    short = enc.encode(ScoringInput("Hi", "Yo"))
    assert not short.truncated


def test_text_pair_truncates_prompt_first_then_response() -> None:
    enc = encoder("text_pair", max_length=10)
    tok = enc.tokenizer
    prompt, reply = "the quick brown fox jumps over the lazy dog", "hello world"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(reply, add_special_tokens=False)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    cut = enc.encode(ScoringInput(prompt, reply))
    assert cut.truncated and len(cut) == 10
    keep = 10 - 3 - len(r_ids)  # CLS, SEP, SEP are never dropped
    assert cut.input_ids == [cls, *p_ids[-keep:], sep, *r_ids, sep]
    assert cut.token_type_ids == [0] * (keep + 2) + [1] * (len(r_ids) + 1)
    # a reply longer than max_length loses its start, never its end
    long_reply = "the quick brown fox jumps over the lazy dog near the river"
    lr_ids = tok(long_reply, add_special_tokens=False)["input_ids"]
    cut = enc.encode(ScoringInput("hello", long_reply))
    assert cut.input_ids == [cls, sep, *lr_ids[-7:], sep]


def test_recipe_refuses_what_the_tokenizer_cannot_do() -> None:
    with pytest.raises(ValueError, match="chat template"):
        encoder("chat", chat=False)
