"""Synthetic, download-free data for the quality benchmark.

A tokenizer-free integer vocabulary:

* specials ``PAD BOS DOT ENT KEY VAL ASK ANS NEEDLE``;
* 10 digit tokens (passkeys);
* ``num_symbols`` symbol tokens (entity names, keys, values, needle names);
* the rest are *words* of a fixed random "language": a first-order Markov chain
  whose successor table is drawn once from ``GRAMMAR_SEED`` (so every model and
  every evaluation sees the same language).

Four kinds of training sequences (recall is evaluated on kv and passkey, perplexity on text):

* **text**: sentences of the Markov language, with *entity mentions*
  ``ENT s1 s2 s3``: each document has a few entities; after an entity's first
  mention its 2nd and 3rd symbols are predictable only by recalling the earlier
  mention (long-range signal for perplexity).
* **kv** (key-value retrieval): pairs ``KEY k v1 v2 DOT`` between short
  sentences; a query ``ASK k`` is answered ``v1 v2`` (keys and values come from
  disjoint halves of the symbols).
* **passkey** (multi-needle passkey): text with needles ``NEEDLE n d d d d d DOT``;
  ``ASK n`` is answered with the five digits of needle ``n``.
* **copy**: blocks of random symbols, each followed by its repeat (training only).

Keys and needle names are single symbols, distinct within a sequence, and the
answer directly follows the queried symbol, as after its first occurrence: the
retrieval is the classic induction / associative-recall pattern.

Training sequences carry many queries, each about a pair / needle not asked
before, starting after a random fraction of the document (dense recall
supervision at all distances); an optional ``max_distance`` bounds how far back
a training query may look (the distance curriculum of ``run_quality.py``:
short lookups first); evaluation samples are a context of exactly ``length`` raw tokens that ends with
a query about a pair / needle never asked before, plus the answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np

PAD, BOS, DOT, ENT, KEY, VAL, ASK, ANS, NEEDLE = range(9)
DIGIT0 = 16
SYMBOL0 = 32
GRAMMAR_SEED = 1234
TASKS = ("kv", "passkey")


@dataclass(frozen=True)
class Vocab:
    """Token ranges of the integer vocabulary."""

    size: int = 2048
    num_symbols: int = 768

    def __post_init__(self):
        if self.size - SYMBOL0 - self.num_symbols < 64:
            raise ValueError(f"vocab {self.size} too small for {self.num_symbols} symbols and >= 64 words")

    @property
    def word0(self) -> int:
        return SYMBOL0 + self.num_symbols

    @property
    def num_words(self) -> int:
        return self.size - self.word0


@dataclass
class EvalSample:
    task: str
    prompt: List[int]  # exactly `length` raw tokens, ending with the query (... ASK x)
    answer: List[int]  # tokens the model must produce greedily
    distance: int  # raw tokens between the start of the target pair/needle and the end of the prompt


class Language:
    """The fixed Markov "language" plus the task builders, all driven by one ``np.random.Generator``."""

    def __init__(self, vocab: Vocab = Vocab(), successors: int = 6):
        self.vocab = vocab
        g = np.random.default_rng(GRAMMAR_SEED)
        nw = vocab.num_words
        self.succ = [list(map(int, row)) for row in g.integers(0, nw, size=(nw, successors))]
        zipf = 1.0 / np.arange(1, successors + 1) ** 1.2
        self.succ_p = zipf / zipf.sum()
        uni = 1.0 / np.arange(1, nw + 1) ** 1.0
        self.uni_p = uni / uni.sum()

    # ------------------------------------------------------------------ pieces
    def sentence(self, rng: np.random.Generator, n: Optional[int] = None, dot: bool = True) -> List[int]:
        """One sentence of the Markov language (``n`` words, then DOT)."""
        n = int(rng.integers(5, 15)) if n is None else n
        if n <= 0:
            return []
        choices = rng.choice(len(self.succ_p), size=n, p=self.succ_p).tolist()
        w = int(rng.choice(self.vocab.num_words, p=self.uni_p))
        out = [w]
        for c in choices[1:]:
            w = self.succ[w][c]
            out.append(w)
        w0 = self.vocab.word0
        toks = [w0 + x for x in out]
        return toks + [DOT] if dot else toks

    def symbols(self, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
        """``n`` distinct tuples of ``k`` symbols; their first symbols are distinct too when ``n <= num_symbols``."""
        ns = self.vocab.num_symbols
        if n <= ns:
            first = rng.permutation(ns)[:n]
            rest = rng.integers(0, ns, size=(n, k - 1))
            return SYMBOL0 + np.concatenate([first[:, None], rest], axis=1)
        if n > ns**k:
            raise ValueError(f"cannot draw {n} distinct {k}-tuples of {ns} symbols")
        codes = rng.choice(ns**k, size=n, replace=False)
        digits = [(codes // ns**i) % ns for i in reversed(range(k))]
        return SYMBOL0 + np.stack(digits, axis=1)

    # -------------------------------------------------------------------- text
    def _text_segments(self, rng, entities: np.ndarray, p_entity: float = 0.2):
        """Infinite stream of text segments (sentences and entity mentions)."""
        while True:
            if len(entities) and rng.random() < p_entity:
                e = entities[int(rng.integers(0, len(entities)))]
                yield [ENT, *map(int, e)]
            else:
                yield self.sentence(rng)

    def text(self, rng: np.random.Generator, length: int) -> List[int]:
        """A text document of exactly ``length`` tokens (starts with BOS)."""
        entities = self.symbols(rng, int(rng.integers(8, 17)), 3)
        out = [BOS]
        for seg in self._text_segments(rng, entities):
            out.extend(seg)
            if len(out) >= length:
                return out[:length]
        raise AssertionError  # pragma: no cover

    # ---------------------------------------------------------------- training
    def kv_table(self, rng: np.random.Generator, length: int):
        """Keys and values of a kv document: distinct keys from the first half of the symbols, value
        pairs from the second half, so a key never also occurs as a value (the lookup is unambiguous)."""
        half = self.vocab.num_symbols // 2
        n_pairs = min(length // 8 + 8, half)
        keys = SYMBOL0 + rng.permutation(half)[:n_pairs]
        vals = SYMBOL0 + half + rng.integers(0, self.vocab.num_symbols - half, size=(n_pairs, 2))
        return keys, vals

    def kv_train(self, rng: np.random.Generator, length: int, ask_from: Optional[float] = None,
                 max_distance: Optional[int] = None) -> List[int]:
        """KV document with queries (training). Pairs come all along; queries start after ``ask_from``
        of the document (default: uniform in [0, 0.6) per document) and each asks a pair not asked
        before, drawn uniformly from the pairs shown so far - and, with ``max_distance``, shown at
        most ``max_distance`` tokens before the query (the distance curriculum: a pair older than
        the bound is never asked). Documents that ask from the start give
        many short lookups (the signal that makes recall emerge); the others spread query distances
        over the whole context, as in the evaluation. (With queries from the start only, a model
        learned lookups within ~128 tokens; with repeated queries, it learned to copy the earlier
        ``ASK k``'s answer instead of looking the pair up.) ``ask_from`` does not depend on
        ``max_distance``: the pairs shown before the first query are a stock that spreads the
        bounded distances over [0, max_distance] (length 2048, bound 1024: median distance 286,
        34% of the queries beyond 512)."""
        ask_from = float(rng.uniform(0.0, 0.6)) if ask_from is None else ask_from
        keys, vals = self.kv_table(rng, length)
        return self._fresh_queries(
            rng, length, ask_from, KEY, keys, vals, rates_asking=(0.45, 0.25), rates_before=(0.0, 0.6),
            filler=lambda: self.sentence(rng, int(rng.integers(2, 9))), max_distance=max_distance)

    def passkey_train(self, rng: np.random.Generator, length: int, ask_from: Optional[float] = None,
                      max_distance: Optional[int] = None) -> List[int]:
        """Text with needles all along and passkey queries after ``ask_from`` of the document; each
        needle is asked at most once, at most ``max_distance`` tokens after it (see ``kv_train``)."""
        ask_from = float(rng.uniform(0.0, 0.6)) if ask_from is None else ask_from
        entities = self.symbols(rng, int(rng.integers(8, 17)), 3)
        n_needles = max(4, length // 64)
        names = self.symbols(rng, n_needles, 1)[:, 0]
        keys = DIGIT0 + rng.integers(0, 10, size=(n_needles, 5))
        segs = self._text_segments(rng, entities)
        return self._fresh_queries(
            rng, length, ask_from, NEEDLE, names, keys, rates_asking=(0.25, 0.06), rates_before=(0.0, 0.15),
            filler=lambda: next(segs), max_distance=max_distance)

    @staticmethod
    def _fresh_queries(rng, length, ask_from, marker, names, answers, rates_asking, rates_before, filler,
                       max_distance=None):
        """The training document shared by kv and passkey: ``marker name answer... DOT`` items shown
        in order, ``ASK name answer... DOT`` queries each about an item shown and not asked before,
        and ``filler()`` segments. ``rates_*`` are the per-segment probabilities of (query, new
        item) after / before ``ask_from`` of the document. With ``max_distance``, a query may only
        ask an item whose marker is at most ``max_distance`` tokens before the ``ASK``; older items
        drop out of the candidates for good (distances only grow), and are never asked.
        ``max_distance=None`` draws exactly the same documents as before the bound existed."""
        out, shown, fresh, start = [BOS], 0, [], []
        while len(out) < length:
            p_query, p_item = rates_asking if len(out) >= ask_from * length else rates_before
            if max_distance is not None:
                # ``fresh`` is in order of appearance: the out-of-range items are a prefix
                while fresh and len(out) - start[fresh[0]] > max_distance:
                    fresh.pop(0)
            u = rng.random()
            if fresh and u < p_query:
                j = fresh.pop(int(rng.integers(0, len(fresh))))
                out += [ASK, int(names[j]), *map(int, answers[j]), DOT]
            elif u < p_query + p_item and shown < len(names):
                start.append(len(out))
                out += [marker, int(names[shown]), *map(int, answers[shown]), DOT]
                fresh.append(shown)
                shown += 1
            else:
                out += filler()
        return out[:length]

    def copy_train(self, rng: np.random.Generator, length: int) -> List[int]:
        """Blocks of random symbols, each followed by its exact repeat (``S block DOT block DOT``).

        Every token of a repeat is predictable by induction (find the previous occurrence of the
        current token, copy its successor), the mechanism kv and passkey recall are built on, so
        the copy task gives that mechanism a dense training signal where the answer tokens are
        rare. Block lengths vary up to half the sequence, so copy distances do too."""
        out = [BOS]
        while len(out) < length:
            n = int(rng.integers(4, max(5, (length - len(out)) // 2)))
            block = (SYMBOL0 + rng.integers(0, self.vocab.num_symbols, size=n)).tolist()
            out += block + [DOT] + block + [DOT]
        return out[:length]

    def train_sequence(self, rng: np.random.Generator, length: int, mix=(1, 1, 1, 0),
                       max_distance: Optional[int] = None) -> List[int]:
        """One training sequence: text, kv, passkey or copy, drawn with weights ``mix`` (3 or 4 of them).
        ``max_distance`` bounds how far back a kv / passkey query may look (None: anywhere)."""
        p = np.asarray(mix, dtype=float)
        kind = int(rng.choice(len(p), p=p / p.sum()))
        if kind == 0:
            return self.text(rng, length)
        if kind == 1:
            return self.kv_train(rng, length, max_distance=max_distance)
        if kind == 2:
            return self.passkey_train(rng, length, max_distance=max_distance)
        return self.copy_train(rng, length)

    # -------------------------------------------------------------- evaluation
    def kv_eval(self, rng: np.random.Generator, length: int, p_query: float = 0.25) -> EvalSample:
        """A kv context of exactly ``length`` tokens ending in ``ASK k``; answer ``v1 v2``."""
        keys, vals = self.kv_table(rng, length)
        n_pairs = len(keys)
        body_len = length - 2
        out, shown, starts = [BOS], 0, []
        while True:
            u = rng.random()
            if shown >= 2 and u < p_query:
                # in-context queries ask odd-numbered pairs only: even ones stay fresh for the final query
                # (odd ones may be asked twice here; the final query never is)
                j = 2 * int(rng.integers(0, shown // 2)) + 1
                seg = [ASK, int(keys[j]), *map(int, vals[j]), DOT]
            elif u < p_query + 0.45 and shown < n_pairs:
                seg = [KEY, int(keys[shown]), *map(int, vals[shown]), DOT]
            else:
                seg = self.sentence(rng, int(rng.integers(2, 9)))
            if len(out) + len(seg) > body_len:
                out += self.sentence(rng, body_len - len(out), dot=False)
                break
            if seg[0] == KEY:
                starts.append(len(out))
                shown += 1
            out += seg
        t = 2 * int(rng.integers(0, (shown + 1) // 2))
        prompt = out + [ASK, int(keys[t])]
        return EvalSample("kv", prompt, list(map(int, vals[t])), length - starts[t])

    def passkey_eval(self, rng: np.random.Generator, length: int, n_needles: int = 4) -> EvalSample:
        """Text of exactly ``length`` tokens with ``n_needles`` needles at uniform depths, ending
        in ``ASK n``; answer: the 5 digits of needle ``n``."""
        entities = self.symbols(rng, int(rng.integers(8, 17)), 3)
        names = self.symbols(rng, n_needles, 1)[:, 0]
        keys = DIGIT0 + rng.integers(0, 10, size=(n_needles, 5))
        body_len = length - 2
        depths = sorted(int(d) for d in rng.integers(1, max(2, body_len - 8), size=n_needles))
        out, starts, k = [BOS], [], 0
        segs = self._text_segments(rng, entities)
        while True:
            if k < n_needles and len(out) >= depths[k]:
                seg = [NEEDLE, int(names[k]), *map(int, keys[k]), DOT]
            else:
                seg = next(segs)
            if len(out) + len(seg) > body_len:
                out += self.sentence(rng, body_len - len(out), dot=False)
                break
            if seg[0] == NEEDLE:
                starts.append(len(out))
                k += 1
            out += seg
        placed = len(starts)
        if placed == 0:  # pathological tiny lengths: put one needle right after BOS
            out = [BOS, NEEDLE, int(names[0]), *map(int, keys[0]), DOT] + out[1 : body_len - 7]
            starts, placed = [1], 1
        t = int(rng.integers(0, placed))
        prompt = out + [ASK, int(names[t])]
        return EvalSample("passkey", prompt, list(map(int, keys[t])), length - starts[t])

    def eval_sample(self, task: str, rng: np.random.Generator, length: int) -> EvalSample:
        if task == "kv":
            return self.kv_eval(rng, length)
        if task == "passkey":
            return self.passkey_eval(rng, length)
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def eval_set(lang: Language, task: str, length: int, n: int, seed: int) -> List[EvalSample]:
    """``n`` evaluation samples of one task and context length (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    return [lang.eval_sample(task, rng, length) for _ in range(n)]


def text_set(lang: Language, length: int, n: int, seed: int) -> List[List[int]]:
    """``n`` held-out text documents of ``length`` tokens (perplexity)."""
    rng = np.random.default_rng([seed, 99, length])
    return [lang.text(rng, length) for _ in range(n)]


def answer_mask(ids: np.ndarray) -> np.ndarray:
    """Boolean mask of the answer tokens in ``[B, L]`` (or ``[L]``) token ids: the tokens after each
    ``ASK x`` up to the next ``DOT`` (the value tokens of a kv query, the digits of a passkey query).

    The training loss weights these up: they are the only tokens whose prediction needs long-range
    recall, and they are a small share of the stream."""
    ids = np.asarray(ids)
    flat = ids.reshape(-1, ids.shape[-1])
    out = np.zeros(flat.shape, dtype=bool)
    for row, seq in enumerate(flat):
        for j in np.flatnonzero(seq == ASK):
            k = j + 2
            while k < len(seq) and seq[k] != DOT:
                out[row, k] = True
                k += 1
    return out.reshape(ids.shape)


def train_batches(lang: Language, batch: int, length: int, seed: int, mix=(1, 1, 1),
                  max_distance: Optional[int] = None) -> Iterator[np.ndarray]:
    """Infinite stream of ``[batch, length]`` int64 training batches (raw tokens, no gists)."""
    rng = np.random.default_rng([seed, 7])
    while True:
        yield np.asarray([lang.train_sequence(rng, length, mix, max_distance) for _ in range(batch)], dtype=np.int64)
