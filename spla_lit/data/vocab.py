"""Synthetic integer vocabulary for the generated long-context tasks (no tokenizer).

Layout of the ids (``V = vocab_size``, ``n = V - NUM_SPECIAL``)::

    [0, 16)             special tokens: PAD=0 BOS=1 EOS=2 SEP=3 KEY=4 VAL=5 QUERY=6 ANS=7 VAR=8 EQ=9,
                        10..15 reserved
    filler words        the rest of the ids (about 40%), rendered ``w<i>``: haystack text and the word lists
    key words           n // 5 ids, rendered ``k<i>``: NIAH / MQAR keys (several tokens per key)
    value words         n // 5 ids, rendered ``v<i>``: NIAH / MQAR / variable-tracking values
    variable names      max(n // 5, 10) ids, rendered ``x<i>``: variable-tracking names

The ranges are disjoint, so the kind of every token is known from its id alone; ``<i>`` is the index
inside the range (``w0`` is the first filler id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

NUM_SPECIAL = 16
SPECIAL_NAMES = ("PAD", "BOS", "EOS", "SEP", "KEY", "VAL", "QUERY", "ANS", "VAR", "EQ")
MIN_VOCAB_SIZE = 64


@dataclass(frozen=True)
class Vocab:
    """Id ranges of the synthetic vocabulary (see the module docstring). Frozen, hence hashable."""

    vocab_size: int = 512

    PAD: ClassVar[int] = 0
    BOS: ClassVar[int] = 1
    EOS: ClassVar[int] = 2
    SEP: ClassVar[int] = 3
    KEY: ClassVar[int] = 4
    VAL: ClassVar[int] = 5
    QUERY: ClassVar[int] = 6
    ANS: ClassVar[int] = 7
    VAR: ClassVar[int] = 8
    EQ: ClassVar[int] = 9

    filler_ids: range = field(init=False, repr=False)
    key_ids: range = field(init=False, repr=False)
    value_ids: range = field(init=False, repr=False)
    var_ids: range = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ValueError(f"vocab_size must be an int, got {self.vocab_size!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {self.vocab_size}")
        n = self.vocab_size - NUM_SPECIAL
        n_key = n_val = n // 5
        n_var = max(n // 5, 10)  # variable tracking needs (hops + 1) * chains distinct names
        n_fill = n - n_key - n_val - n_var
        start = NUM_SPECIAL
        ranges = {}
        for name, size in (("filler_ids", n_fill), ("key_ids", n_key), ("value_ids", n_val),
                           ("var_ids", n_var)):
            ranges[name] = range(start, start + size)
            start += size
        for name, r in ranges.items():
            object.__setattr__(self, name, r)  # frozen dataclass: computed fields set once here

    def token_str(self, token: int) -> str:
        """Human-readable form of one id: ``<KEY>``, ``w12``, ``k3``, ``v201``, ``x5`` (``<?id>`` if unknown)."""
        t = int(token)
        if 0 <= t < len(SPECIAL_NAMES):
            return f"<{SPECIAL_NAMES[t]}>"
        if 0 <= t < NUM_SPECIAL:
            return f"<R{t}>"
        for prefix, r in (("w", self.filler_ids), ("k", self.key_ids), ("v", self.value_ids),
                          ("x", self.var_ids)):
            if t in r:
                return f"{prefix}{t - r.start}"
        return f"<?{t}>"

    def decode(self, ids: Iterable[int]) -> str:
        """Space-separated rendering of a token sequence (list, numpy array or 1-D tensor), for debugging."""
        return " ".join(self.token_str(t) for t in ids)
