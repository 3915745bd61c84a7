"""Tokenizer support: the built-in byte-level BPE tokenizer and the engine's tokenizer wrapper.

Model weights cannot be downloaded where pdserve is developed and tested, so the built-in models
(see ``engine.builtin``) ship a real byte-level BPE tokenizer trained here, deterministically, on a
small embedded English corpus. Because it is a genuine Hugging Face fast tokenizer saved in the
standard format, the same ``Tokenizer`` wrapper serves it and real checkpoints alike.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: specials are added to the vocab first, so they get ids 0..4.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)

BUILTIN_VOCAB_SIZE = 512

# ChatML. `message['content']` is validated to be a str by Tokenizer.apply_chat_template, but the
# template itself stays permissive so HF's own apply_chat_template renders it identically.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Training text for the built-in tokenizer. Varied everyday English so the learned merges are the
# usual ones (" the", "ing", " and", ...) and common text encodes to noticeably fewer tokens than
# bytes. Changing it changes every built-in model's vocabulary; engine.builtin folds
# TOKENIZER_FINGERPRINT into its cache key, so cached models regenerate automatically.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and it barked at the fox "
    "until the fox ran back into the forest. In the morning the farmer found the fence broken and "
    "the chickens walking around the yard, looking for something to eat.",
    "Once upon a time there was a small village at the edge of a great river. The people of the "
    "village were farmers and fishermen, and every evening they would gather in the square to talk "
    "about the weather, the harvest, and the news that travellers brought from the cities.",
    "Language models read text as a sequence of tokens. A tokenizer splits the text into pieces, "
    "and each piece is mapped to a number. The model then predicts the next token, one step at a "
    "time, and the tokenizer turns the numbers back into text that people can read.",
    "Serving a large model is mostly a question of memory and scheduling. Requests arrive at "
    "different times and with different lengths, so the server batches them together, keeps the "
    "attention cache for every request, and streams the generated text back as soon as it is ready.",
    "She opened the window and looked out at the city. It was raining again, and the streets were "
    "full of people with umbrellas, hurrying to work. He said that he would call her later, but she "
    "knew that he was always busy on Mondays.",
    "What is the best way to learn something new? Some people like to read books, others prefer to "
    "watch videos or to practise with friends. Whatever you choose, it helps to start with simple "
    "questions, to make mistakes, and to try again until the answer becomes clear.",
    "Hello! How are you today? I am fine, thank you. Could you please help me with this problem? "
    "Of course, I would be happy to help. Let us think about it step by step and write down what "
    "we know, what we want to find, and which information is still missing.",
    "The history of science is full of surprising discoveries. Water boils at one hundred degrees, "
    "light travels faster than sound, and the planets move around the sun in orbits that were first "
    "described more than four hundred years ago by careful observers of the night sky.",
    "Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in many documents, together with "
    'punctuation like commas, full stops, question marks, brackets (like these), quotes "like '
    'these", and symbols such as +, -, *, / and =.',
    'def main():\n    print("hello, world")\n    for i in range(10):\n        total = total + i\n    return total\n',
)


# Qwen2's pre-tokenizer split (digits one by one, letters grouped with one leading non-letter).
# transformers >= 5 loads any `model_type: qwen2` directory with Qwen2Tokenizer, which rebuilds the
# pipeline as NFC + this split + byte-level, whatever tokenizer.json says; the built-in qwen2 model
# therefore ships a tokenizer trained with exactly that pipeline, so its files mean what they say.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TokenizerStyle = Literal["gpt2", "qwen2"]
TOKENIZER_STYLES: tuple[TokenizerStyle, ...] = ("gpt2", "qwen2")


def _build_raw_tokenizer(style: TokenizerStyle) -> RawTokenizer:
    raw = RawTokenizer(models.BPE())
    if style == "gpt2":
        # add_prefix_space=False: encode(text) is exactly the text's bytes, with no invented space.
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "qwen2":
        # NFC means decomposed sequences (e + U+0301) come back precomposed, as with real Qwen2.
        raw.normalizer = normalizers.NFC()
        raw.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {TOKENIZER_STYLES}")
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # Every one of the 256 byte symbols is in the vocab whether or not the corpus uses it, so any
        # UTF-8 text (CJK, emoji, ...) encodes losslessly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The BPE trainer is deterministic: pair ties break on token ids, and ids come from the sorted
    # alphabet plus merge order, never from hash-map iteration.
    raw.train_from_iterator(list(_CORPUS), trainer=trainer)
    # No post-processor: encode() must not add bos; templates/callers add specials explicitly.
    return raw


def _fingerprint() -> str:
    payload = json.dumps(
        {
            "corpus": _CORPUS,
            "specials": SPECIAL_TOKENS,
            "vocab_size": BUILTIN_VOCAB_SIZE,
            "template": CHATML_TEMPLATE,
            "qwen2_regex": QWEN2_PRETOKENIZE_REGEX,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Identifies the built-in tokenizer's definition (not the library versions that train it).
TOKENIZER_FINGERPRINT: str = _fingerprint()


def build_byte_level_tokenizer(style: TokenizerStyle = "gpt2") -> transformers.PreTrainedTokenizerFast:
    """Train the built-in byte-level BPE tokenizer (512 tokens incl. specials), deterministically.

    `style="gpt2"` (the default, used by the llama and mistral built-ins) is plain GPT-2 byte-level
    BPE: any text round-trips exactly. `style="qwen2"` is the pipeline transformers imposes on qwen2
    directories (see QWEN2_PRETOKENIZE_REGEX), which NFC-normalises its input.
    """
    raw = _build_raw_tokenizer(style)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Saved as an explicit null: model-specific tokenizer classes that AutoTokenizer may pick
        # (Qwen2Tokenizer) otherwise add their default unk "<|endoftext|>" as token 512, past the
        # model's vocab. Byte-level BPE never needs an unk.
        unk_token=None,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        # Byte-level decoding is already exact; the legacy clean-up would eat spaces before punctuation.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tok.chat_template = CHATML_TEMPLATE
    if len(tok) != BUILTIN_VOCAB_SIZE:
        # The corpus must offer enough distinct pairs to fill the vocab; fail loudly if it shrinks.
        raise RuntimeError(f"built-in tokenizer has {len(tok)} tokens, expected {BUILTIN_VOCAB_SIZE}")
    return tok


class PromptTooLong(ValueError):
    """A text prompt whose UTF-8 size alone shows it cannot encode to `max_tokens` tokens (refused untokenized)."""

    def __init__(self, size_bytes: int, max_tokens: int, max_token_bytes: int) -> None:
        self.size_bytes, self.max_tokens, self.max_token_bytes = size_bytes, max_tokens, max_token_bytes
        self.limit_bytes = limit = max_tokens * max_token_bytes
        super().__init__(f"the prompt is {size_bytes} bytes of UTF-8 text; {max_tokens} tokens cover at most {limit}")


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its `raise_exception`) or failed to render it."""


# Files any one of which means "a tokenizer lives here" for the loaders transformers supports.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    """The engine's view of a Hugging Face tokenizer loaded from a model directory."""

    def __init__(self, hf_tokenizer: transformers.PreTrainedTokenizerBase, extra_eos_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        eos: list[int] = []
        if hf_tokenizer.eos_token_id is not None:
            eos.append(int(hf_tokenizer.eos_token_id))
        for i in extra_eos_ids:
            if int(i) not in eos:
                eos.append(int(i))
        self._eos_token_ids = eos
        self.max_token_bytes: int | None = max_token_bytes(hf_tokenizer)  # once: a walk over the whole vocab

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory {str(path)!r} does not exist or is not a directory")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(
                f"no tokenizer files in {str(path)!r}: expected one of {', '.join(_TOKENIZER_FILES)}; "
                "save the tokenizer there with tokenizer.save_pretrained(dir), or point at a full "
                "Hugging Face model directory"
            )
        try:
            hf = transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # transformers raises many types (OSError, ValueError, JSON errors...)
            raise ValueError(
                f"could not load the tokenizer in {str(path)!r} ({type(exc).__name__}: {exc}); "
                "the tokenizer files are missing or corrupt, re-save them with save_pretrained"
            ) from exc
        return cls(hf, _generation_config_eos_ids(path))

    # -- basic coding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone: no bos/eos is added (chat templates add what they need)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The one rule for a plain-text prompt (`pdserve generate`, /generate, /v1/completions alike): the
        tokenizer's special tokens are added, as transformers' default `add_special_tokens=True` (a BOS on
        Llama-style tokenizers), vLLM and SGLang do. With `max_tokens`, a text too large for that many tokens
        is refused by its size (`PromptTooLong`) before tokenization, which would cost a huge token list first.
        """
        self.check_prompt_size(text, max_tokens)
        return list(self.hf.encode(text, add_special_tokens=True))

    def check_prompt_size(self, text: str, max_tokens: int | None) -> None:
        """`PromptTooLong` when `text` has more UTF-8 bytes than `max_tokens` tokens can stand for; ValueError
        when it is not valid Unicode (a lone surrogate, e.g. from an undecodable command-line argument)."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(f"the prompt is not valid Unicode: lone surrogate at character {exc.start}") from None
        if max_tokens is not None and self.max_token_bytes is not None and size > max_tokens * self.max_token_bytes:
            raise PromptTooLong(size, max_tokens, self.max_token_bytes)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    # -- chat -------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages` (what apply_chat_template tokenizes)."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template (tokenizer_config.json / chat_template.jinja); "
                "send a plain prompt instead of chat messages"
            )
        _validate_messages(messages)
        # Render to text, then encode without adding specials: the template already contains every
        # special token it wants, and this avoids HF's version-dependent tokenize=True return types.
        try:
            text = self.hf.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja2's TemplateError from the template's raise_exception, or any bug in it
            why = (str(exc) or type(exc).__name__)[:500]
            raise ChatTemplateError(f"the chat template refused the conversation: {why}") from exc
        if not isinstance(text, str):
            raise ChatTemplateError(f"chat template rendered a {type(text).__name__}, expected text")
        return text

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, max_tokens: int | None = None
    ) -> list[int]:
        """The one rule for a chat prompt: the template's text, encoded without adding specials (the template
        writes its own BOS; adding the tokenizer's would make a second one). `max_tokens` as in `encode_prompt`."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        self.check_prompt_size(text, max_tokens)
        return self.encode(text)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the tokenizer's eos, then generation_config.json's eos ids."""
        return list(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        # len() counts added/special tokens, which `hf.vocab_size` leaves out.
        return len(self.hf)

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's pad id; falls back to the first eos id (padding is always masked anyway)."""
        if self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def bos_token_id(self) -> int | None:
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)


def max_token_bytes(hf: transformers.PreTrainedTokenizerBase) -> int | None:
    """The most UTF-8 bytes of input text one token can stand for; None when the pipeline has no such bound
    (it drops text, or maps an unbounded run of unknown text to one token) or cannot be inspected. A piece
    spells at least the normalized bytes it covers (byte-level: one character per byte; SentencePiece's U+2581
    is one space; byte fallback `<0x41>` one byte); a normalizer that shrinks text (NFKC: "𝐀", 4 bytes, is "A")
    multiplies the bound."""
    try:
        spec = json.loads(hf.backend_tokenizer.to_str())  # a slow tokenizer has none: AttributeError
    except Exception:
        return None
    vocab, model, pre = hf.get_vocab(), spec.get("model") or {}, _pre_tokenizers(spec.get("pre_tokenizer"))
    factor = _normalizer_factor(spec.get("normalizer"))
    # An added token with lstrip/rstrip swallows every space beside it; pre-tokenizers outside _KEEPING drop text.
    strips = any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])
    keeps = all(q.get("type") in _KEEPING and str(q.get("behavior")).lower() != "removed" for q in pre)
    if factor is None or strips or not keeps or not _covers_all_text(model, pre, vocab):
        return None
    longest = max((len(piece.encode("utf-8", "surrogatepass")) for piece in vocab), default=1)
    if model.get("unk_token") is not None:
        longest = max(longest, 4)  # an unknown character (up to 4 bytes) becomes one unk token
    return max(1, math.ceil(longest * factor))


# Unicode normalization turns at most 4 bytes into 1 (NFKC of math letters; lower-casing U+212A: 3 into 1; NFC
# of Hangul jamo: 9 into 3). Strip, StripAccents, BertNormalizer, Precompiled may remove characters: no bound.
_SHRINKING = {"NFC": 4.0, "NFD": 4.0, "NFKC": 4.0, "NFKD": 4.0, "Lowercase": 4.0, "Prepend": 1.0, "Append": 1.0}
# Pre-tokenizers that pass every byte on (Whitespace, WhitespaceSplit, BertPreTokenizer drop spaces).
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def _normalizer_factor(n: Any) -> float | None:
    if n is None:
        return 1.0
    if n.get("type") == "Sequence":
        factors = [_normalizer_factor(sub) for sub in n.get("normalizers", [])]
        return None if None in factors else math.prod(f for f in factors if f)
    if n.get("type") == "Replace":  # e.g. SentencePiece's " " -> U+2581: only a literal pattern has a known ratio
        pattern, content = (n.get("pattern") or {}).get("String"), n.get("content") or ""
        return max(1.0, len(pattern.encode()) / len(content.encode())) if isinstance(pattern, str) and content else None
    return _SHRINKING.get(n.get("type"))


def _pre_tokenizers(p: Any) -> list[dict[str, Any]]:
    if p is None or p.get("type") != "Sequence":
        return [] if p is None else [p]
    return [q for sub in p.get("pretokenizers", []) for q in _pre_tokenizers(sub)]


def _covers_all_text(model: dict[str, Any], pre: list[dict[str, Any]], vocab: Mapping[str, int]) -> bool:
    """Whether each token covers a bounded span: no fused unk runs, no dropped unknown characters."""
    if model.get("byte_fallback"):
        return True
    if model.get("type") != "BPE":
        return False  # Unigram fuses unknown runs; WordLevel / WordPiece make a whole unknown word one token
    byte_level = any(q.get("type") == "ByteLevel" for q in pre)
    if byte_level and all(c in vocab for c in pre_tokenizers.ByteLevel.alphabet()):
        return True  # every byte has its own piece: nothing is unknown
    # Otherwise an unknown character becomes unk (one each, unless a run is fused into one) or, with no
    # unk token, is dropped.
    return model.get("unk_token") is not None and not model.get("fuse_unk")


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}] is missing {key!r}")
            if not isinstance(m[key], str):
                raise ValueError(f"messages[{i}][{key!r}] must be a string, got {type(m[key]).__name__}")


def _generation_config_eos_ids(model_dir: Path) -> list[int]:
    """eos_token_id from `generation_config.json` (int or list), if the directory has one."""
    gc = model_dir / "generation_config.json"
    if not gc.is_file():
        return []
    try:
        data = json.loads(gc.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(gc)!r} is not valid JSON: {exc}") from exc
    eos = data.get("eos_token_id") if isinstance(data, dict) else None
    if eos is None:
        return []
    items = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"{str(gc)!r}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return list(items)


_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals the full decode.

    Each step decodes a short window: `_prefix_offset.._read_offset` is already-emitted context and
    `_read_offset..` is pending. The context matters for tokenizers whose decoders depend on the
    neighbouring tokens (e.g. SentencePiece dropping a leading space); diffing against it yields the
    exact delta. Text ending in U+FFFD is held back: it usually means the bytes of one character are
    split across tokens, and the next token completes it. Because offsets only advance when the
    window ends on a complete character, each new window starts on a character boundary.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prefix_ids: Sequence[int] = ()):
        """`prefix_ids` (e.g. the prompt) are decoding context only; their text is never emitted."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prefix_ids)
        # A few tokens of context suffice for every decoder we know; keep windows short so each
        # step costs O(1) rather than O(length).
        self._prefix_offset = max(len(self.ids) - 6, 0)
        self._read_offset = len(self.ids)
        self._prefix_text: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if not final and (len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self._prefix_text = None
        return delta

    def add(self, token_id: int) -> str:
        """Append one id; return the text it finalises (possibly empty)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. an incomplete character at the very end)."""
        if self._read_offset == len(self.ids):
            return ""
        return self._emit(final=True)
