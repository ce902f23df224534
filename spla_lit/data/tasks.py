"""Generated long-context tasks: NIAH variants, MQAR, variable tracking, common / frequent words.

Every task has ``generate(rng, length) -> Sample`` where ``rng`` is a :class:`numpy.random.Generator`
(the only randomness used; the caller seeds it) and the sample has exactly ``length`` tokens::

    BOS  <context: haystack / word list, ``length`` - (structure) tokens of it>  <query section>  EOS

The query section comes last; ``Sample.answer`` marks the answer tokens in it (value / name / word
tokens only, never the markers, SEP or EOS), so teacher-forced exact match over the marked tokens is the
task accuracy. Haystack filler comes from :class:`FillerLanguage`, a sparse bigram Markov chain over the
filler words that is fixed by ``language_seed`` (shared by train and eval, independent of the sample).

Formats (``k``/``v``/``x``/``w`` are key / value / variable / filler words, see :mod:`.vocab`)::

    niah_*             needles  KEY k k VAL v v  in filler;  query  QUERY k k ANS v v [SEP v v ...]
    mqar               pairs  k k v v  in the first half of the filler, queries  k k v v  in the second half
                       (no markers, Zoology style: a key's second occurrence is a query)
    copy               a span  s s s ... s  (key / value words) in filler, repeated later: every repeated token after
                       the first is an answer (a dense induction warm-up for the recall tasks)
    variable_tracking  VAR x EQ v v  /  VAR x' EQ x  chains in filler;  QUERY v v ANS x x' x'' ...
                       (RULER form: all names holding the value, in chain = text order)
    common_words       w w w ... (no filler)  QUERY ANS w w w   (top words by count desc, then id)
    frequent_words     same layout, words drawn from a Zipf law
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .vocab import Vocab

V = Vocab  # special-token ids are class attributes of Vocab


@dataclass
class Sample:
    """One generated sequence.

    tokens: ``length`` token ids, ``tokens[0] == BOS``.
    answer: ``length`` flags, True on the answer tokens (always some, all in the final query section).
    task: the name of the generator that made it (for ``niah`` the variant actually drawn).
    """

    tokens: list[int]
    answer: list[bool]
    task: str


# ------------------------------------------------------------------------------------------ helpers


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _distinct_tuples(rng: np.random.Generator, ids: range, n: int, k: int) -> list[list[int]]:
    """``n`` distinct random ``k``-token tuples over ``ids`` (caller checks ``n <= len(ids) ** k``)."""
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < n:
        for row in rng.integers(0, len(ids), size=(n - len(out), k)).tolist():
            key = tuple(row)
            if key not in seen:
                seen.add(key)
                out.append([ids.start + x for x in row])
    return out


def _random_positions(rng: np.random.Generator, lo: int, hi: int, n: int) -> list[int]:
    """``n`` sorted insertion points in ``[lo, hi]`` (several items may share one point)."""
    return np.sort(rng.integers(lo, hi + 1, size=n)).tolist()


def _top_words(words: np.ndarray, k: int) -> list[int]:
    """The ``k`` most frequent ids of ``words``, ordered by count (descending), then id (ascending)."""
    ids, counts = np.unique(words, return_counts=True)
    order = np.lexsort((ids, -counts))  # last key is the primary one
    return ids[order[:k]].tolist()


class _Builder:
    """Accumulates tokens and answer spans; starts with BOS."""

    def __init__(self) -> None:
        self.tokens: list[int] = [V.BOS]
        self.spans: list[tuple[int, int]] = []

    def add(self, tokens: Sequence[int], answer: bool = False) -> None:
        if answer:
            self.spans.append((len(self.tokens), len(tokens)))
        self.tokens.extend(tokens)

    def splice(self, filler: list[int], positions: list[int],
               items: list[list[tuple[list[int], bool]]]) -> None:
        """Filler with ``items[i]`` (a list of (tokens, is_answer) parts) inserted before ``filler[positions[i]]``.

        ``positions`` must be sorted.
        """
        prev = 0
        for pos, parts in zip(positions, items):
            self.tokens.extend(filler[prev:pos])
            prev = pos
            for toks, ans in parts:
                self.add(toks, ans)
        self.tokens.extend(filler[prev:])

    def finish(self, length: int, task: str) -> Sample:
        if len(self.tokens) != length:  # a bug in a generator's min_length bookkeeping
            raise AssertionError(f"{task}: built {len(self.tokens)} tokens, expected {length}")
        answer = [False] * length
        for start, n in self.spans:
            answer[start:start + n] = [True] * n
        return Sample(self.tokens, answer, task)


# ------------------------------------------------------------------------------------------ filler


class FillerLanguage:
    """Sparse bigram Markov chain over the filler words: each word has ``branching`` successors.

    The successor sets come from ``seed`` (the ``language_seed``) only, so train and eval share one
    "language" whatever the sample seeds; the successor probabilities are 1/r normalised (r = rank).
    Use :func:`filler_language` to get a cached instance.
    """

    def __init__(self, vocab: Vocab, seed: int = 0, branching: int = 4):
        _check_int("language_seed", seed, 0)
        n = len(vocab.filler_ids)
        self.branching = _check_int("branching", branching, 1, n - 1)
        g = np.random.default_rng([seed, 0x11A6])
        self.offset = vocab.filler_ids.start
        # successors[w] = local indices of the words that may follow local word w (never w itself:
        # self-loops make degenerate "w w w w" runs)
        self.successors: list[list[int]] = []
        for w in range(n):
            succ = g.choice(n - 1, branching, replace=False)
            self.successors.append((succ + (succ >= w)).tolist())
        # Successor probabilities 1/r, shared by all words (only the successor sets differ): this lets
        # sample() draw every step's successor rank in one vectorised call.
        p = 1.0 / np.arange(1, branching + 1)
        self.probs = p / p.sum()
        self.num_words = n

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` filler token ids: a random start word, then ``n - 1`` Markov steps."""
        if n <= 0:
            return []
        choices = rng.choice(self.branching, size=n - 1, p=self.probs).tolist()
        succ, off = self.successors, self.offset
        s = int(rng.integers(self.num_words))
        out = [s + off]
        append = out.append
        for j in choices:  # inherently sequential; ~5 ms per 64K tokens
            s = succ[s][j]
            append(s + off)
        return out


@functools.lru_cache(maxsize=16)
def filler_language(vocab: Vocab, seed: int = 0, branching: int = 4) -> FillerLanguage:
    """Cached :class:`FillerLanguage` (building one for a large vocab costs a few ms)."""
    return FillerLanguage(vocab, seed, branching)


# ------------------------------------------------------------------------------------------ tasks


class Task:
    """Base class: ``generate(rng: numpy.random.Generator, length: int) -> Sample``.

    ``min_length`` is the shortest ``length`` the task fits in (its structure with no filler).
    """

    name: ClassVar[str] = ""

    def __init__(self, vocab: Vocab, *, language_seed: int = 0):
        if not isinstance(vocab, Vocab):
            raise ValueError(f"vocab must be a Vocab, got {type(vocab).__name__}")
        self.vocab = vocab
        self.language_seed = language_seed
        self.language = filler_language(vocab, language_seed)

    @property
    def min_length(self) -> int:
        raise NotImplementedError

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        raise NotImplementedError

    def _check_length(self, length: int) -> int:
        length = _check_int("length", length, 1)
        if length < self.min_length:
            raise ValueError(f"length={length} is too short for task {self.name!r} with these settings: "
                             f"it needs at least {self.min_length} tokens")
        return length


class NeedleInAHaystack(Task):
    """RULER needle in a haystack: key -> value needles at random depths in filler, then queries.

    Needle ``KEY k*key_len VAL v*value_len``; ``num_keys`` distinct keys with ``num_values`` needles
    each (distinct values), ``num_queries`` distinct keys queried in random order, each as
    ``QUERY k.. ANS v.. [SEP v.. ...]`` with the key's values in order of appearance (answer tokens:
    the values). ``depth`` in [0, 1] pins the first needle of the first queried key at that relative
    position of the haystack (0 = right after BOS, 1 = just before the query); None: random.
    """

    name = "niah_single"

    def __init__(self, vocab: Vocab, *, num_keys: int = 1, num_values: int = 1, num_queries: int = 1,
                 key_len: int = 2, value_len: int = 2, depth: float | None = None, language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        self.num_keys = _check_int("num_keys", num_keys, 1)
        self.num_values = _check_int("num_values", num_values, 1)
        self.num_queries = _check_int("num_queries", num_queries, 1, self.num_keys)
        self.key_len = _check_int("key_len", key_len, 1)
        self.value_len = _check_int("value_len", value_len, 1)
        if self.num_keys > len(vocab.key_ids) ** self.key_len:
            raise ValueError(f"num_keys={num_keys} exceeds the {len(vocab.key_ids)}**{key_len} distinct keys "
                             "of this vocab: raise key_len or vocab_size")
        if self.num_keys * self.num_values > len(vocab.value_ids) ** self.value_len:
            raise ValueError(f"num_values={num_values}: num_keys * num_values exceeds the distinct values "
                             "of this vocab: raise value_len or vocab_size")
        if depth is not None and not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depth must be None or in [0, 1], got {depth}")
        self.depth = None if depth is None else float(depth)

    @property
    def min_length(self) -> int:
        needles = self.num_keys * self.num_values * (2 + self.key_len + self.value_len)
        query = 2 + self.key_len + self.num_values * (self.value_len + 1) - 1
        return 1 + needles + self.num_queries * query + 1

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        length = self._check_length(length)
        nk, nv = self.num_keys, self.num_values
        keys = _distinct_tuples(rng, self.vocab.key_ids, nk, self.key_len)
        values = _distinct_tuples(rng, self.vocab.value_ids, nk * nv, self.value_len)
        queried = rng.permutation(nk)[: self.num_queries].tolist()
        n_fill = length - self.min_length
        pos = rng.integers(0, n_fill + 1, size=nk * nv)
        if self.depth is not None:
            pos[queried[0] * nv] = round(self.depth * n_fill)
        order = np.argsort(pos, kind="stable").tolist()  # needle i belongs to key i // nv
        filler = self.language.sample(rng, n_fill)

        b = _Builder()
        items = [[([V.KEY, *keys[i // nv], V.VAL, *values[i]], False)] for i in order]
        b.splice(filler, sorted(pos.tolist()), items)
        seen: list[list[list[int]]] = [[] for _ in range(nk)]  # values of each key in text order
        for i in order:
            seen[i // nv].append(values[i])
        for k in queried:
            b.add([V.QUERY, *keys[k], V.ANS])
            for j, val in enumerate(seen[k]):
                if j:
                    b.add([V.SEP])
                b.add(val, answer=True)
        b.add([V.EOS])
        return b.finish(length, self.name)


class NIAHMultiKey(NeedleInAHaystack):
    """NIAH with ``num_keys - 1`` distractor needles (other keys); one key queried."""

    name = "niah_multikey"

    def __init__(self, vocab: Vocab, *, num_keys: int = 4, num_values: int = 1, num_queries: int = 1,
                 key_len: int = 2, value_len: int = 2, depth: float | None = None, language_seed: int = 0):
        super().__init__(vocab, num_keys=num_keys, num_values=num_values, num_queries=num_queries,
                         key_len=key_len, value_len=value_len, depth=depth, language_seed=language_seed)


class NIAHMultiValue(NeedleInAHaystack):
    """NIAH with one key inserted ``num_values`` times with different values; answer all, in text order."""

    name = "niah_multivalue"

    def __init__(self, vocab: Vocab, *, num_keys: int = 1, num_values: int = 4, num_queries: int = 1,
                 key_len: int = 2, value_len: int = 2, depth: float | None = None, language_seed: int = 0):
        super().__init__(vocab, num_keys=num_keys, num_values=num_values, num_queries=num_queries,
                         key_len=key_len, value_len=value_len, depth=depth, language_seed=language_seed)


class NIAHMultiQuery(NeedleInAHaystack):
    """NIAH with ``num_keys`` needles, ``num_queries`` of them queried (each followed by its value)."""

    name = "niah_multiquery"

    def __init__(self, vocab: Vocab, *, num_keys: int = 4, num_values: int = 1, num_queries: int = 4,
                 key_len: int = 2, value_len: int = 2, depth: float | None = None, language_seed: int = 0):
        super().__init__(vocab, num_keys=num_keys, num_values=num_values, num_queries=num_queries,
                         key_len=key_len, value_len=value_len, depth=depth, language_seed=language_seed)


class NIAHMixture(Task):
    """Training NIAH: each sample draws one of single / multikey / multivalue / multiquery uniformly.

    ``num_needles`` is the keys (multikey, multiquery) or values (multivalue) of the multi variants.
    ``Sample.task`` is the variant drawn.
    """

    name = "niah"

    def __init__(self, vocab: Vocab, *, num_needles: int = 4, key_len: int = 2, value_len: int = 2,
                 language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        n = _check_int("num_needles", num_needles, 2)
        kw = dict(key_len=key_len, value_len=value_len, language_seed=language_seed)
        self.variants: list[NeedleInAHaystack] = [
            NeedleInAHaystack(vocab, **kw),
            NIAHMultiKey(vocab, num_keys=n, **kw),
            NIAHMultiValue(vocab, num_values=n, **kw),
            NIAHMultiQuery(vocab, num_keys=n, num_queries=n, **kw),
        ]

    @property
    def min_length(self) -> int:
        return max(t.min_length for t in self.variants)

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        self._check_length(length)
        return self.variants[int(rng.integers(len(self.variants)))].generate(rng, length)


class MQAR(Task):
    """Multi-query associative recall (Zoology style) spread over filler.

    ``num_pairs`` pairs ``k*key_len v*value_len`` (distinct keys, random values) at random points of
    the first half of the filler, then ``num_queries`` distinct keys, each directly followed by its value
    (the answer), at random points of the second half. No markers: the key / value / filler id ranges
    are disjoint, and a key's second occurrence is its query.
    """

    name = "mqar"

    def __init__(self, vocab: Vocab, *, num_pairs: int = 16, num_queries: int = 8, key_len: int = 2,
                 value_len: int = 2, language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        self.num_pairs = _check_int("num_pairs", num_pairs, 1)
        self.num_queries = _check_int("num_queries", num_queries, 1, self.num_pairs)
        self.key_len = _check_int("key_len", key_len, 1)
        self.value_len = _check_int("value_len", value_len, 1)
        if self.num_pairs > len(vocab.key_ids) ** self.key_len:
            raise ValueError(f"num_pairs={num_pairs} exceeds the {len(vocab.key_ids)}**{key_len} distinct keys "
                             "of this vocab: raise key_len or vocab_size")

    @property
    def min_length(self) -> int:
        return 1 + (self.num_pairs + self.num_queries) * (self.key_len + self.value_len) + 1

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        length = self._check_length(length)
        keys = _distinct_tuples(rng, self.vocab.key_ids, self.num_pairs, self.key_len)
        vals = (rng.integers(0, len(self.vocab.value_ids), size=(self.num_pairs, self.value_len))
                + self.vocab.value_ids.start).tolist()
        queried = rng.permutation(self.num_pairs)[: self.num_queries].tolist()
        n_fill = length - self.min_length
        half = n_fill // 2
        # pairs in [0, half], queries in [half, n_fill]: every query comes after every pair
        positions = (_random_positions(rng, 0, half, self.num_pairs)
                     + _random_positions(rng, half, n_fill, self.num_queries))
        items = ([[(keys[i] + vals[i], False)] for i in range(self.num_pairs)]
                 + [[(keys[i], False), (vals[i], True)] for i in queried])
        b = _Builder()
        b.splice(self.language.sample(rng, n_fill), positions, items)
        b.add([V.EOS])
        return b.finish(length, self.name)


class Copy(Task):
    """Induction warm-up: a random span, filler, then the same span again (no markers).

    ``BOS  w..  s_1 .. s_L  w..  s_1 .. s_L  w..  EOS`` with ``L = span_len`` tokens drawn i.i.d. from the key and
    value words (disjoint from the filler, so a span token's earlier occurrence is unambiguous) and the filler split
    at random into the three gaps. Answer tokens: ``s_2 .. s_L`` of the repeat (each is the token that followed the
    current one in the first copy: what an induction head predicts; ``s_1`` is unpredictable). With ``L - 1``
    answers per sample instead of the ~16 of ``niah_single`` / ``mqar``, the answer loss gives the induction
    mechanism a dense gradient; mixed with those tasks it is the curriculum of study stage A
    (``conf/experiment/study_a.yaml``). The query section is the repeat, not the sequence end (unlike the other
    tasks, trailing filler may follow it).
    """

    name = "copy"

    def __init__(self, vocab: Vocab, *, span_len: int = 32, language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        self.span_len = _check_int("span_len", span_len, 2)
        self._ids = np.concatenate([np.asarray(vocab.key_ids), np.asarray(vocab.value_ids)])

    @property
    def min_length(self) -> int:
        return 1 + 2 * self.span_len + 1

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        length = self._check_length(length)
        span = self._ids[rng.integers(0, len(self._ids), size=self.span_len)].tolist()
        n_fill = length - self.min_length
        positions = _random_positions(rng, 0, n_fill, 2)
        b = _Builder()
        b.splice(self.language.sample(rng, n_fill), positions,
                 [[(span, False)], [(span[:1], False), (span[1:], True)]])
        b.add([V.EOS])
        return b.finish(length, self.name)


class VariableTracking(Task):
    """RULER variable tracking: ``VAR x0 EQ v..`` then ``VAR x1 EQ x0``, ``VAR x2 EQ x1`` ... in filler.

    ``num_chains`` chains (one queried, the others distractors, each with its own value) of
    ``num_hops`` copies each; the statements of different chains interleave at random, each chain's in
    order. Query (RULER form): ``QUERY v.. ANS x0 x1 .. x_hops`` -- the names of all variables holding
    the queried value, in chain order (= order of their assignment in the text).
    """

    name = "variable_tracking"

    def __init__(self, vocab: Vocab, *, num_chains: int = 2, num_hops: int = 4, value_len: int = 2,
                 language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        self.num_chains = _check_int("num_chains", num_chains, 1)
        self.num_hops = _check_int("num_hops", num_hops, 1)
        self.value_len = _check_int("value_len", value_len, 1)
        if self.num_chains * (self.num_hops + 1) > len(vocab.var_ids):
            raise ValueError(f"num_chains * (num_hops + 1) = {self.num_chains * (self.num_hops + 1)} exceeds "
                             f"the {len(vocab.var_ids)} variable names of this vocab")
        if self.num_chains > len(vocab.value_ids) ** self.value_len:
            raise ValueError(f"num_chains={num_chains} exceeds the distinct values of this vocab")

    @property
    def min_length(self) -> int:
        c, h, vl = self.num_chains, self.num_hops, self.value_len
        return 1 + c * (3 + vl + 4 * h) + (2 + vl + h + 1) + 1

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        length = self._check_length(length)
        c, h = self.num_chains, self.num_hops
        var_ids = self.vocab.var_ids
        names = (rng.choice(len(var_ids), size=c * (h + 1), replace=False) + var_ids.start).tolist()
        chains = [names[i * (h + 1):(i + 1) * (h + 1)] for i in range(c)]
        values = _distinct_tuples(rng, self.vocab.value_ids, c, self.value_len)
        statements: list[list[tuple[list[int], bool]]] = []
        step = [0] * c
        for ch in rng.permutation(np.repeat(np.arange(c), h + 1)).tolist():
            k = step[ch]
            step[ch] += 1
            rhs = values[ch] if k == 0 else [chains[ch][k - 1]]
            statements.append([([V.VAR, chains[ch][k], V.EQ, *rhs], False)])
        n_fill = length - self.min_length
        b = _Builder()
        b.splice(self.language.sample(rng, n_fill), _random_positions(rng, 0, n_fill, len(statements)),
                 statements)
        b.add([V.QUERY, *values[0], V.ANS])  # chain 0 is the queried one (chains are exchangeable)
        b.add(chains[0], answer=True)
        b.add([V.EOS])
        return b.finish(length, self.name)


class _WordListTask(Task):
    """Shared layout of the aggregation tasks: ``BOS w*W QUERY ANS a*num_answers EOS``."""

    num_answers: int

    def _min_words(self) -> int:
        raise NotImplementedError

    @property
    def min_length(self) -> int:
        return 1 + self._min_words() + 2 + self.num_answers + 1

    def _num_words(self, length: int) -> int:
        return length - 4 - self.num_answers

    def _build(self, words: np.ndarray, length: int) -> Sample:
        b = _Builder()
        b.add(words.tolist())
        b.add([V.QUERY, V.ANS])
        b.add(_top_words(words, self.num_answers), answer=True)
        b.add([V.EOS])
        return b.finish(length, self.name)


class CommonWords(_WordListTask):
    """RULER common words extraction (CWE): a shuffled list of filler words (no haystack).

    ``num_common`` common words occur ``freq_ratio`` times as often as the uncommon ones (which use the
    rest of the filler words, as many as fit); the answer is the common words by count (descending),
    then id -- in practice by id, as the common counts are equal or nearly so. Counts are built so that
    every common word is strictly more frequent than every uncommon one.
    """

    name = "common_words"

    def __init__(self, vocab: Vocab, *, num_common: int = 5, freq_ratio: int = 8, language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        self.num_common = _check_int("num_common", num_common, 1, len(vocab.filler_ids) // 2)
        self.freq_ratio = _check_int("freq_ratio", freq_ratio, 2)
        self.num_answers = self.num_common

    def _min_words(self) -> int:
        return self.num_common * self.freq_ratio + 1

    def _counts(self, num_words: int) -> tuple[int, np.ndarray]:
        """(number of uncommon words U, counts of the num_common + U words, common first)."""
        n, r = self.num_common, self.freq_ratio
        u_max = len(self.vocab.filler_ids) - n
        u = max(1, num_words // (n * r + u_max))  # base count of an uncommon word
        c = r * u
        n_unc = min(u_max, (num_words - n * c) // u)
        counts = np.concatenate([np.full(n, c), np.full(n_unc, u)])
        rest = num_words - n * c - n_unc * u
        # spread the rest: uncommon words up to c - 1 each, what remains onto the common words
        extra = min(rest, n_unc * (c - 1 - u))
        counts[n:] += extra // n_unc
        counts[n:n + extra % n_unc] += 1
        rest -= extra
        counts[:n] += rest // n
        counts[:rest % n] += 1
        return n_unc, counts

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        length = self._check_length(length)
        n = self.num_common
        n_unc, counts = self._counts(self._num_words(length))
        chosen = rng.permutation(len(self.vocab.filler_ids))[: n + n_unc]
        # which uncommon / common words got the +1 of the remainder is random
        counts[n:] = rng.permutation(counts[n:])
        counts[:n] = rng.permutation(counts[:n])
        words = rng.permutation(np.repeat(chosen, counts)) + self.vocab.filler_ids.start
        return self._build(words, length)


class FrequentWords(_WordListTask):
    """RULER frequent words extraction (FWE): filler words drawn i.i.d. from a Zipf law (exponent
    ``alpha``) over a random ranking of the filler words; the answer is the ``num_top`` most frequent
    words by observed count (descending), then id. The top ``num_top`` ranks occur at least once.
    """

    name = "frequent_words"

    def __init__(self, vocab: Vocab, *, num_top: int = 3, alpha: float = 2.0, language_seed: int = 0):
        super().__init__(vocab, language_seed=language_seed)
        self.num_top = _check_int("num_top", num_top, 1, len(vocab.filler_ids))
        if not float(alpha) > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.num_answers = self.num_top
        p = np.arange(1, len(vocab.filler_ids) + 1, dtype=np.float64) ** -self.alpha
        self._p = p / p.sum()

    def _min_words(self) -> int:
        return 4 * self.num_top

    def generate(self, rng: np.random.Generator, length: int) -> Sample:
        length = self._check_length(length)
        n_words = self._num_words(length)
        rank_to_word = rng.permutation(len(self.vocab.filler_ids))
        ranks = np.concatenate([np.arange(self.num_top),
                                rng.choice(len(self._p), size=n_words - self.num_top, p=self._p)])
        words = rank_to_word[rng.permutation(ranks)] + self.vocab.filler_ids.start
        return self._build(words, length)


# ------------------------------------------------------------------------------------------ registry

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    NIAHMixture, NeedleInAHaystack, NIAHMultiKey, NIAHMultiValue, NIAHMultiQuery,
    MQAR, Copy, VariableTracking, CommonWords, FrequentWords,
)}

# The RULER-style evaluation suite (MQAR is added as the Zoology-style recall probe).
RULER_TASKS: tuple[str, ...] = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
    "variable_tracking", "common_words", "frequent_words", "mqar",
)


def make_task(name: str, vocab: Vocab, **kwargs: Any) -> Task:
    """Instantiate the task registered as ``name`` (a key of :data:`TASKS`) with its constructor kwargs."""
    if name not in TASKS:
        raise ValueError(f"name: unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](vocab, **kwargs)
