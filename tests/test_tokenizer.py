"""The built-in byte-level BPE tokenizer and the engine's Tokenizer / IncrementalDetokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from tokenization.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    IncrementalDetokenizer,
    Tokenizer,
    build_byte_level_tokenizer,
)

ROUND_TRIP_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading and trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\nwindows line\n",
    "日本語のテキストと中文文本",
    "emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "combining: e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
    "mixed ✓ → ∑ ∞ Ωmega ß ﬁ",
    "special-looking text <|im_start|> is parsed as the special token",
]


@pytest.fixture(scope="module")
def hf_tok() -> transformers.PreTrainedTokenizerFast:
    return build_byte_level_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(hf_tok: transformers.PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    hf_tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


def test_vocab_and_special_tokens(hf_tok: transformers.PreTrainedTokenizerFast, tok: Tokenizer) -> None:
    assert len(hf_tok) == 512
    assert tok.vocab_size == 512
    vocab = hf_tok.get_vocab()
    # Specials are trained first, so their ids are fixed and small.
    assert [vocab[t] for t in (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)] == [0, 1, 2, 3, 4]
    assert hf_tok.bos_token == BOS_TOKEN
    assert hf_tok.eos_token == EOS_TOKEN
    assert tok.pad_token_id == 4
    assert tok.bos_token_id == 0
    # No generation_config.json in a bare tokenizer dir: only the tokenizer's own eos.
    assert tok.eos_token_ids == [1]


def test_training_is_deterministic(hf_tok: transformers.PreTrainedTokenizerFast) -> None:
    again = build_byte_level_tokenizer()
    assert again.backend_tokenizer.to_str() == hf_tok.backend_tokenizer.to_str()


def test_qwen2_style(hf_tok: transformers.PreTrainedTokenizerFast) -> None:
    qwen = build_byte_level_tokenizer("qwen2")
    assert len(qwen) == 512
    assert qwen.get_vocab()[IM_END_TOKEN] == hf_tok.get_vocab()[IM_END_TOKEN]
    # Qwen2 splits numbers into single digits and NFC-normalises; GPT-2 style keeps both as given.
    assert len(qwen.encode("20242024", add_special_tokens=False)) == 8
    assert qwen.decode(qwen.encode("e\u0301", add_special_tokens=False)) == "\u00e9"
    assert hf_tok.decode(hf_tok.encode("e\u0301", add_special_tokens=False)) == "e\u0301"
    text = "Hello 😀 日本語"
    assert qwen.decode(qwen.encode(text, add_special_tokens=False)) == text
    with pytest.raises(ValueError, match="unknown tokenizer style"):
        build_byte_level_tokenizer("bert")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    if "<|" not in text:
        assert tok.decode(ids) == text


def test_encode_adds_no_special_tokens(tok: Tokenizer) -> None:
    assert tok.encode("") == []
    ids = tok.encode("Hello")
    assert 0 not in ids and 1 not in ids


def test_common_english_uses_merges(tok: Tokenizer) -> None:
    text = "The people of the city were reading the news and talking about the weather in the morning."
    ids = tok.encode(text)
    assert len(ids) < 0.6 * len(text.encode())
    pieces = tok.hf.convert_ids_to_tokens(ids)
    assert "Ġthe" in pieces  # the most common English word is a single token


def test_save_reload_identical(hf_tok: transformers.PreTrainedTokenizerFast, tok_dir: Path) -> None:
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert reloaded.backend_tokenizer.to_str() == hf_tok.backend_tokenizer.to_str()
    assert reloaded.get_vocab() == hf_tok.get_vocab()
    assert reloaded.all_special_tokens == hf_tok.all_special_tokens
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert reloaded.chat_template == hf_tok.chat_template
    for text in ROUND_TRIP_TEXTS:
        assert reloaded.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi there! 👋\nHow are you?"},
]
EXPECTED_CHATML = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there! 👋\nHow are you?<|im_end|>\n"
)


def test_chat_template(tok: Tokenizer) -> None:
    with_prompt = EXPECTED_CHATML + "<|im_start|>assistant\n"
    assert tok.render_chat(MESSAGES) == with_prompt
    assert tok.render_chat(MESSAGES, add_generation_prompt=False) == EXPECTED_CHATML
    ids = tok.apply_chat_template(MESSAGES)
    assert tok.decode(ids, skip_special_tokens=False) == with_prompt
    assert ids[0] == 2  # <|im_start|> is one special token, not its characters
    assert ids.count(3) == 2  # one <|im_end|> per message
    assert tok.decode(ids) == "system\nYou are helpful.\nuser\nHi there! 👋\nHow are you?\nassistant\n"
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert tok.decode(no_prompt, skip_special_tokens=False) == EXPECTED_CHATML


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "user"}], "missing 'content'"),
        ([{"content": "x"}], "missing 'role'"),
        ([{"role": "user", "content": 5}], "must be a string"),
        (["hello"], "must be a dict"),
    ],
)
def test_chat_messages_validated(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_no_chat_template_is_clear_error(tmp_path: Path) -> None:
    hf = build_byte_level_tokenizer()
    hf.chat_template = None
    hf.save_pretrained(str(tmp_path))
    t = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(("eos", "expected"), [([1, 3], [1, 3]), (3, [1, 3]), (1, [1]), (None, [1])])
def test_eos_ids_from_generation_config(
    hf_tok: transformers.PreTrainedTokenizerFast, tmp_path: Path, eos: object, expected: list[int]
) -> None:
    hf_tok.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == expected


def test_missing_tokenizer_is_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no tokenizer files in .*save_pretrained") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_corrupt_tokenizer_is_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="missing or corrupt") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_incremental_detokenizer_emoji(tok: Tokenizer) -> None:
    text = "Hi 😀😀 there 🎉👍🏽 ok 👨‍👩‍👧‍👦 日本語 é\u0301 done 🇫🇷!" * 3
    ids = tok.encode(text)
    # The point of the test: many tokens carry only part of a character's bytes.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = _stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left pending at the end


def test_incremental_detokenizer_specials(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template(MESSAGES) + tok.encode("Sure 👍") + [3]
    for skip in (True, False):
        deltas = _stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("Prompt with emoji 😀 ")
    gen = tok.encode("and a reply 🎉 in the stream")
    deltas = _stream(IncrementalDetokenizer(tok, prefix_ids=prompt), gen)
    assert "".join(deltas) == "and a reply 🎉 in the stream"


def test_incremental_detokenizer_invalid_utf8(tok: Tokenizer) -> None:
    # A random model can emit byte tokens that never form valid UTF-8: the result must still equal
    # the full decode, with the dangling bytes released by flush().
    byte_token = {b: tok.hf.convert_tokens_to_ids(ch) for ch, b in _byte_chars().items()}
    ids = [*tok.encode("ok "), byte_token[0x9F], *tok.encode(" mid "), byte_token[0xF0], byte_token[0x9F]]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert "".join(deltas) + tail == tok.decode(ids)
    assert tail.endswith("\ufffd")


def _byte_chars() -> dict[str, int]:
    """GPT-2's byte -> printable-character table, inverted (char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


# -- the prompt rule and the byte bound ----------------------------------------------------------------------

BOUND_TEXTS = [
    *ROUND_TRIP_TEXTS,
    " " * 3000,  # a long run a pre-tokenizer might fold into few tokens
    "\U0001d400\U0001d401" * 200,  # 4-byte letters NFKC would shrink
    "\u1100\u1161\u11a8" * 200,  # Hangul jamo NFC composes, 9 bytes into 3
    "e\u0301" * 300,
    "<|im_start|><|begin_of_text|>" * 50,  # specials: the longest pieces
]


def _hf(raw: object, **kw: object) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **kw)


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_max_token_bytes_bounds_every_encoding(style: str) -> None:
    """The invariant the byte cap rests on: no text has more UTF-8 bytes than its tokens × max_token_bytes."""
    t = Tokenizer(build_byte_level_tokenizer(style))  # type: ignore[arg-type]
    longest = max(len(p.encode()) for p in t.hf.get_vocab())
    assert t.max_token_bytes == (longest if style == "gpt2" else 4 * longest)  # qwen2 normalizes (NFC)
    for text in BOUND_TEXTS:
        if text:
            assert len(t.encode_prompt(text)) * t.max_token_bytes >= len(text.encode()), text[:40]


def test_max_token_bytes_is_none_where_no_bound_holds() -> None:
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Raw

    def word_level() -> Raw:
        raw = Raw(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        return raw

    assert Tokenizer(_hf(word_level())).max_token_bytes is None  # a whole unknown word is one token
    bpe = build_byte_level_tokenizer()._tokenizer
    stripped = Raw.from_str(bpe.to_str())
    stripped.normalizer = normalizers.Strip()
    assert Tokenizer(_hf(stripped)).max_token_bytes is None  # a normalizer that removes text
    swallowing = Raw.from_str(bpe.to_str())
    swallowing.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert Tokenizer(_hf(swallowing)).max_token_bytes is None  # a token that eats the spaces beside it
    sp = Raw(models.BPE({"<unk>": 0, "<0x20>": 1, "\u2581": 2, "a": 3}, [], unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    assert Tokenizer(_hf(sp)).max_token_bytes == 6  # SentencePiece-style: "<0x20>" is the longest piece


def test_encode_prompt_refuses_by_size_and_invalid_unicode(tok: Tokenizer) -> None:
    from tokenization.tokenizer import PromptTooLong

    assert tok.max_token_bytes is not None
    limit = 10 * tok.max_token_bytes
    assert tok.encode_prompt("a" * limit, max_tokens=10)  # at the limit: tokenized (and then counted)
    with pytest.raises(PromptTooLong) as info:
        tok.encode_prompt("a" * (limit + 1), max_tokens=10)
    assert (info.value.size_bytes, info.value.limit_bytes) == (limit + 1, limit)
    with pytest.raises(PromptTooLong):  # chat: the rendered text is what counts
        tok.apply_chat_template([{"role": "user", "content": "a" * limit}], max_tokens=10)
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode_prompt("a\udcff")  # what an undecodable command-line byte becomes


def test_a_refusing_template_raises_chat_template_error(tok_dir: Path) -> None:
    from tokenization.tokenizer import ChatTemplateError

    t = Tokenizer.from_pretrained(tok_dir)
    t.hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
