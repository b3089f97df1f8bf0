"""The one configuration object of unigist."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from . import layout

__all__ = ["GistConfig"]


@dataclass(frozen=True)
class GistConfig:
    """How gist tokens are laid out and which keys a query sees.

    Attributes:
        ratio: raw tokens per gist token; after every ``ratio`` raw tokens one
            gist token is inserted.
        window: local window, in interleaved positions: a query at position
            ``i`` sees every key ``j`` with ``i - j < window``. Must be > ``ratio``
            (a gist must see its whole group).
        num_sink: leading interleaved positions that every query sees.
        gist_token: text of the special gist token added to a tokenizer.
        gist_token_id: its id, once known (set by :func:`unigist.patch_model`).
        gist_predicts_next: which output predicts the raw token that follows a gist.
            False (default): the raw token before the gist predicts it and the gist is
            memory only (no label, its logits never read). True: the gist's own output
            (the gist closes its group and the next token is read off it). Training labels
            (:func:`unigist.layout.insert_gists`, :class:`unigist.GistCollator`) and
            :func:`unigist.generate` both follow it. The default is the CPU quality study's
            choice (``benchmarks/results/quality_cpu.md``): on the same runs the memory-only
            gist recalled as well overall and better on answers right after a gist, with a
            lower training loss in every seed. A saved config without this field (older
            unigist) reads back as True, the convention it was trained with.

    The mask over the interleaved sequence (query ``i``, key ``j``) is
    ``j <= i and (j < num_sink or is_gist(j) or i - j < window)``.
    """

    ratio: int = 4
    window: int = 1024
    num_sink: int = 128
    gist_token: str = "<|gist|>"
    gist_token_id: Optional[int] = None
    gist_predicts_next: bool = False

    def __post_init__(self) -> None:
        for name, low in (("ratio", 1), ("window", 1), ("num_sink", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GistConfig.{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"GistConfig.{name} must be >= {low}, got {value}")
        if self.window <= self.ratio:
            raise ValueError(
                f"GistConfig.window ({self.window}) must be > ratio ({self.ratio}): a gist sees the raw tokens of "
                f"its group (the {self.ratio} positions before it) only through the window, so with window <= ratio "
                "it would not see its whole group and that group's raw tokens would be lost once evicted"
            )
        if not isinstance(self.gist_predicts_next, bool):
            raise TypeError(
                f"GistConfig.gist_predicts_next must be a bool, got {type(self.gist_predicts_next).__name__}"
            )
        if not isinstance(self.gist_token, str) or not self.gist_token:
            raise ValueError("GistConfig.gist_token must be a non-empty string")
        if self.gist_token_id is not None:
            if isinstance(self.gist_token_id, bool) or not isinstance(self.gist_token_id, int):
                raise TypeError("GistConfig.gist_token_id must be an int or None")
            if self.gist_token_id < 0:
                raise ValueError(f"GistConfig.gist_token_id must be >= 0, got {self.gist_token_id}")

    @property
    def period(self) -> int:
        """Length of one raw group plus its gist: ``ratio + 1``."""
        return self.ratio + 1

    def is_gist(self, position: int) -> bool:
        """Whether interleaved ``position`` holds a gist token."""
        return layout.is_gist(position, self.ratio)

    def max_cache_len(self, seq_len: int) -> int:
        """Most KV entries a compressed cache holds after ``seq_len`` interleaved positions."""
        return min(seq_len, self.num_sink + layout.num_gists(seq_len, self.ratio) + self.window)

    def replace(self, **changes: Any) -> "GistConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
