"""Synthetic token streams for the CPU quality study (no tokenizer, no downloads).

One sequence holds three things at once, so a single pass measures all of them:

* **text**: filler drawn from a fixed random Markov chain (each filler token has a few
  likely successors); its tokens give the perplexity;
* **kv** (multi-query associative recall): ``num_pairs`` pairs ``k v`` sit among the
  filler; each key is asked once later as ``k v`` (the value predicted from the key);
  the distance from the query's key back to the pair's key is drawn per query from the
  distance bins (uniform over bins, then uniform inside the bin);
* **passkey**: a needle ``PASS d1..dP`` and, at the very end, ``ASK d1..dP``; the digits
  are predicted from ``ASK`` onward; the distance from ``ASK`` back to the first digit is
  drawn from the bins as well.

The raw length is ``base_len + offset`` with ``offset`` uniform in ``0..7``, so prompt
lengths (everything up to and including ``ASK``) take every residue modulo 4 and 8.
Distances are in raw tokens (gists are not counted); bins are multiples of the raw window
``W``: ``[2, W)``, ``[W, 2W)``, ``[2W, 4W)``, ``[4W, 8W)``.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

PAD, BOS, PASS, ASK = 0, 1, 2, 3
BIN_NAMES = ("<1x", "1-2x", "2-4x", "4-8x")


@dataclass(frozen=True)
class Vocab:
    num_keys: int = 16
    num_values: int = 16
    num_digits: int = 10
    num_filler: int = 64

    @property
    def key0(self) -> int:
        return 4

    @property
    def value0(self) -> int:
        return self.key0 + self.num_keys

    @property
    def digit0(self) -> int:
        return self.value0 + self.num_values

    @property
    def filler0(self) -> int:
        return self.digit0 + self.num_digits

    @property
    def size(self) -> int:
        return self.filler0 + self.num_filler


@dataclass(frozen=True)
class TaskConfig:
    window: int = 8  # raw window W (distance bins are multiples of it)
    base_len: int = 84  # raw tokens before the length offset
    max_offset: int = 7
    num_pairs: int = 8
    passkey_len: int = 3
    vocab: Vocab = field(default_factory=Vocab)
    markov_seed: int = 1234  # the "language" (same for every run)
    successors: int = 4
    # probability of each distance bin when a distance is drawn (None: uniform, 1/4 each)
    bin_weights: Optional[Tuple[float, float, float, float]] = None

    def bins(self) -> List[Tuple[int, int]]:
        w = self.window
        return [(2, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)]

    def bin_of(self, d: int) -> int:
        for i, (lo, hi) in enumerate(self.bins()):
            if lo <= d < hi:
                return i
        raise ValueError(f"distance {d} outside every bin")


def markov_table(cfg: TaskConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Successor ids ``[F, s]`` and their probabilities ``[F, s]`` of the filler chain."""
    rng = np.random.default_rng(cfg.markov_seed)
    f, s = cfg.vocab.num_filler, cfg.successors
    succ = np.stack([rng.choice(f, size=s, replace=False) for _ in range(f)])
    probs = rng.dirichlet(np.ones(s), size=f)
    return succ, probs


@dataclass
class Sample:
    ids: np.ndarray  # [T] raw token ids
    prompt_len: int  # tokens up to and including ASK (the generation prompt)
    kv_query: np.ndarray  # [Q] raw index of each query key (its value follows it)
    kv_bin: np.ndarray  # [Q] distance bin of each query
    kv_dist: np.ndarray  # [Q]
    pk_bin: int
    pk_dist: int
    text_mask: np.ndarray  # [T] bool: filler token whose predecessor is filler (perplexity targets)


class Generator:
    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.succ, self.probs = markov_table(cfg)
        self.cum = np.cumsum(self.probs, axis=1)
        self._cum_list, self._succ_list = self.cum.tolist(), self.succ.tolist()

    def _filler(self, n: int) -> np.ndarray:
        v, rng, last = self.cfg.vocab, self.rng, self.cfg.successors - 1
        out = np.empty(n, dtype=np.int64)
        cur = int(rng.integers(v.num_filler))
        u = rng.random(n).tolist()
        cum, succ = self._cum_list, self._succ_list  # Python lists: bisect_left == np.searchsorted, faster per call
        for i in range(n):
            out[i] = cur
            cur = succ[cur][min(bisect_left(cum[cur], u[i]), last)]
        return out + v.filler0

    def _distance(self, least: int = 2) -> Tuple[int, int]:
        while True:
            w = self.cfg.bin_weights
            b = int(self.rng.integers(4)) if w is None else int(self.rng.choice(4, p=np.asarray(w) / sum(w)))
            lo, hi = self.cfg.bins()[b]
            if max(lo, least) < hi:
                return b, int(self.rng.integers(max(lo, least), hi))

    def sample(self) -> Sample:
        cfg, v, rng = self.cfg, self.cfg.vocab, self.rng
        while True:
            s = self._try()
            if s is not None:
                return s

    def _try(self):
        cfg, v, rng = self.cfg, self.cfg.vocab, self.rng
        T = cfg.base_len + int(rng.integers(cfg.max_offset + 1))
        P = cfg.passkey_len
        ask = T - P - 1  # ASK index; the digits follow it
        used = np.zeros(T, dtype=bool)
        used[0] = True
        used[ask:] = True
        ids = self._filler(T)
        ids[0] = BOS
        # passkey needle: PASS at ask - d - 1 so that the first digit sits d tokens before ASK
        pk_bin, pk_d = self._distance(least=P)  # the digits end before ASK
        pass_at = ask - pk_d - 1
        if pass_at < 1:
            return None
        used[pass_at : pass_at + P + 1] = True
        digits = rng.integers(v.num_digits, size=P) + v.digit0
        ids[pass_at] = PASS
        ids[pass_at + 1 : pass_at + 1 + P] = digits
        ids[ask] = ASK
        ids[ask + 1 :] = digits
        # kv pairs and their queries
        keys = rng.choice(v.num_keys, size=cfg.num_pairs, replace=False) + v.key0
        vals = rng.integers(v.num_values, size=cfg.num_pairs) + v.value0
        q_idx, q_bin, q_dist = [], [], []
        for k, val in zip(keys, vals):
            for _ in range(50):
                b, d = self._distance()
                q = int(rng.integers(d + 1, ask - 1)) if d + 1 < ask - 1 else -1
                if q < 0:
                    continue
                p = q - d
                if p < 1 or used[p] or used[p + 1] or used[q] or used[q + 1]:
                    continue
                used[[p, p + 1, q, q + 1]] = True
                ids[p], ids[p + 1], ids[q], ids[q + 1] = k, val, k, val
                q_idx.append(q), q_bin.append(b), q_dist.append(d)
                break
            else:
                return None
        fill = (ids >= v.filler0)
        text = np.zeros(T, dtype=bool)
        text[1:] = fill[1:] & fill[:-1]
        order = np.argsort(q_idx)
        return Sample(ids, ask + 1, np.array(q_idx)[order], np.array(q_bin)[order], np.array(q_dist)[order],
                      pk_bin, pk_d, text)


def samples(cfg: TaskConfig, n: int, seed: int) -> List[Sample]:
    g = Generator(cfg, seed)
    return [g.sample() for _ in range(n)]


def answer_labels(s: Sample) -> np.ndarray:
    """``s.ids`` at the answer tokens (kv values after a query, passkey digits after ASK), -100 elsewhere."""
    lab = np.full_like(s.ids, -100)
    idx = np.concatenate([s.kv_query + 1, np.arange(s.prompt_len, len(s.ids))])
    lab[idx] = s.ids[idx]
    return lab


def train_stream(cfg: TaskConfig, steps: int, batch: int, seed: int) -> List[List[dict]]:
    """``steps`` batches of ``batch`` examples ``{"input_ids", "answer_labels"}`` (raw, variable
    lengths): one fixed token stream per seed, shared by every variant."""
    g = Generator(cfg, seed)
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            s = g.sample()
            rows.append({"input_ids": torch.from_numpy(s.ids), "answer_labels": torch.from_numpy(answer_labels(s))})
        out.append(rows)
    return out
