"""The incremental detokenizer of streamed answers (`serving/detokenize.py`) against the whole-answer decode: the pieces
joined equal `tokenizer.decode(ids, skip_special_tokens=True)` on tricky text (multi-byte UTF-8 split across tokens,
byte-level BPE merges, special tokens between words), for the tiny byte-level BPE tokenizer and SmolLM2's."""

import random

import pytest

from modeling_safe_llava.serving.detokenize import IncrementalDetokenizer
from modeling_safe_llava.tiny import build_tiny_tokenizer


TRICKY = [
    "What is shown in this image? A cat, sitting on a mat.",
    "naïve café — déjà vu; Ærøskøbing, Straße",
    "日本語のテキスト, 中文, 한국어",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "combining e\u0301 and tabs\tand  double  spaces\n\nnew lines  ",
    "  leading spaces, trailing ones   ",
    "’curly quotes’ «guillemets» …",
]


def tokenizers():
    yield "tiny", build_tiny_tokenizer()
    try:
        from modeling_safe_llava.tools.embedded import smollm2_gguf_path
        from transformers import AutoTokenizer

        gguf = smollm2_gguf_path()
    except (ImportError, ValueError):
        return
    yield "smollm2", AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


TOKENIZERS = dict(tokenizers())


def with_specials(tokenizer, ids: list[int], seed: int) -> list[int]:
    """`ids` with the tokenizer's special tokens (EOS, BOS, padding) put between some of them."""
    specials = [i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None]
    rng, mixed = random.Random(seed), []
    for token in ids:
        if rng.random() < 0.15:
            mixed.append(rng.choice(specials))
        mixed.append(token)
    return mixed


def streamed(tokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    """The pieces the detokenizer gives for `ids` pushed in chunks of `chunk_sizes` (cycled), then its flush."""
    detokenizer, pieces, position, step = IncrementalDetokenizer(tokenizer), [], 0, 0
    while position < len(ids):
        size = chunk_sizes[step % len(chunk_sizes)]
        pieces.append(detokenizer.push(ids[position : position + size]))
        position, step = position + size, step + 1
    pieces.append(detokenizer.flush())
    return pieces


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("chunks", [[1], [2, 1, 3]])
def test_the_pieces_join_into_the_whole_decode(name, chunks):
    tokenizer = TOKENIZERS[name]
    for seed, text in enumerate(TRICKY):
        ids = with_specials(tokenizer, tokenizer.encode(text, add_special_tokens=False), seed)
        pieces = streamed(tokenizer, ids, chunks)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in piece for piece in pieces)  # a split character is held until it completes


def test_a_character_split_across_tokens_is_held_until_it_completes():
    tokenizer = TOKENIZERS["tiny"]
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE: the emoji's four bytes take several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push([token]) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.push(ids[-1:]) == "😀"


def test_bytes_that_never_complete_come_out_as_the_decode_gives_them():
    tokenizer = TOKENIZERS["tiny"]
    ids = tokenizer.encode("ab😀", add_special_tokens=False)[:-1] + tokenizer.encode(" end", add_special_tokens=False)
    assert "".join(streamed(tokenizer, ids, [1])) == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_step_decodes_a_short_window():
    tokenizer = TOKENIZERS["tiny"]
    ids = tokenizer.encode(" ".join(TRICKY[:1] * 40), add_special_tokens=False)
    detokenizer, widths = IncrementalDetokenizer(tokenizer), []
    for token in ids:
        detokenizer.push([token])
        widths.append(len(detokenizer.tokens) - detokenizer.prefix)
    assert len(ids) > 300 and max(widths) <= 4  # not the whole answer
