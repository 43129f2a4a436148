"""Incremental detokenization: the text of a growing token list without re-decoding all of it.

Streaming used to decode the whole response after every cycle (O(n^2) over a response). Here the
decoded prefix is frozen at a token boundary once decoding is known to split there, i.e.
``decode(a + b) == decode(a) + decode(b)`` for the tokens since the last freeze, with ``a`` not
ending in a partial UTF-8 character. Each call then decodes only the unfrozen tail (a few tokens
to a few dozen), and the text always equals ``frozen text + decode(tail)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

WINDOW = 8  # tokens kept unfrozen: a split is tried once the tail is twice this long


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.frozen = 0  # tokens whose text is fixed
        self.frozen_text = ""

    def text(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, which must extend the ids of the previous call."""
        if len(ids) < self.frozen:
            raise ValueError("ids shrank below the frozen prefix; start a new detokenizer")
        tail = ids[self.frozen :]
        text = self.frozen_text + self.decode(tail)
        if len(tail) >= 2 * WINDOW:
            split = len(tail) - WINDOW
            head = self.decode(tail[:split])
            if (
                not head.endswith("\ufffd")
                and self.frozen_text + head + self.decode(tail[split:]) == text
            ):
                self.frozen += split
                self.frozen_text += head
        return text


__all__ = ["WINDOW", "IncrementalDetokenizer"]
