"""Incremental detokenization gives exactly the text of a full decode, at every length."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.speculative.detokenize import WINDOW, IncrementalDetokenizer


def _decode(tokenizer: Any) -> Any:
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_text_equals_full_decode(tiny_target: Any, seed: int) -> None:
    tokenizer = tiny_target.tokenizer
    decode = _decode(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tiny_target.vocab_size, (200,), generator=generator).tolist()
    detok = IncrementalDetokenizer(decode)
    length = 0
    while length < len(ids):
        length = min(len(ids), length + int(torch.randint(1, 6, (1,), generator=generator)))
        assert detok.text(ids[:length]) == decode(ids[:length])
    assert detok.frozen > len(ids) - 3 * WINDOW  # it did freeze: later calls decode a short tail


def test_partial_utf8_is_never_frozen(smollm2_tokenizer: Any) -> None:
    """Byte-level BPE splits an emoji over several tokens: the text stays a full decode."""
    decode = _decode(smollm2_tokenizer)
    text = "Speculative decoding 🙂🙂 keeps the output — exactly: é, ß, 漢字. " * 6
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(decode)
    for length in range(1, len(ids) + 1):
        assert detok.text(ids[:length]) == decode(ids[:length])
    assert detok.frozen > 0


def test_shrinking_ids_are_refused(tiny_target: Any) -> None:
    detok = IncrementalDetokenizer(_decode(tiny_target.tokenizer))
    detok.text(list(range(5, 60)))
    with pytest.raises(ValueError, match="shrank"):
        detok.text([5])
