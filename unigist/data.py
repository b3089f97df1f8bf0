"""Chunk-free training data: token ids -> the interleaved UniGist layout.

:class:`GistCollator` is a ``data_collator`` for a plain PyTorch loop or the
HF ``Trainer``: it inserts a gist token after every ``ratio`` raw tokens
(:func:`unigist.layout.insert_gists`), gives gists the label ``-100`` (no loss
on them), numbers every position ``0..N-1`` (``position_ids``) and pads on the
right. One forward pass of a patched model over the batch is the whole
chunk-free training step::

    config = unigist.patch_model(model, tokenizer, unigist.GistConfig(ratio=4))
    collate = unigist.GistCollator(config, tokenizer=tokenizer)
    batch = collate([{"input_ids": ids} for ids in token_id_lists])
    loss = model(**batch).loss
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .config import GistConfig
from .layout import insert_gists

__all__ = ["GistCollator", "gist_batch"]


def gist_batch(
    input_ids: torch.Tensor, config: GistConfig, labels: Optional[torch.Tensor] = None
) -> Dict[str, torch.Tensor]:
    """Interleave gists into an unpadded ``[B, L]`` (or ``[L]``) batch: ``input_ids``, ``labels``, ``position_ids``."""
    return insert_gists(input_ids, config, labels=labels)


def _to_list(x) -> List[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


class GistCollator:
    """Collate token-id examples into interleaved, right-padded training batches.

    Args:
        config: the gist layout; ``config.gist_token_id`` must be set (``unigist.patch_model``
            returns such a config).
        tokenizer: optional; supplies the pad id (``pad_token_id``, else ``eos_token_id``).
        pad_token_id: pad id (overrides the tokenizer's); default 0.
        max_length: truncate every example to this many raw tokens before inserting gists.
        pad_to_multiple_of: round the padded interleaved length up to a multiple of this.
        return_attention_mask: also return a ``[B, N]`` right-padding mask (the unigist
            attention ignores right padding anyway, so it is off by default).

    Each example is a sequence of ids, or a mapping with ``input_ids`` and
    optional ``labels`` (same length; ``-100`` entries stay ignored). Returns
    ``input_ids``, ``labels`` (gists and padding ``-100``) and ``position_ids``
    (``0..N-1`` on every row), all ``[B, N]`` int64.
    """

    def __init__(
        self,
        config: GistConfig,
        tokenizer=None,
        pad_token_id: Optional[int] = None,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        return_attention_mask: bool = False,
    ):
        if not isinstance(config, GistConfig):
            raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
        if config.gist_token_id is None:
            raise ValueError(
                "config.gist_token_id is not set; use the config unigist.patch_model returns "
                "(or GistConfig(..., gist_token_id=...))"
            )
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.config = config
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_attention_mask = return_attention_mask

    def _example(self, ex: Union[Mapping[str, Any], Sequence[int], torch.Tensor]) -> Dict[str, torch.Tensor]:
        if isinstance(ex, Mapping):
            ids = _to_list(ex["input_ids"])
            labels = _to_list(ex["labels"]) if ex.get("labels") is not None else None
        else:
            ids, labels = _to_list(ex), None
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        if self.max_length is not None:
            ids = ids[: self.max_length]
            labels = labels[: self.max_length] if labels is not None else None
        if not ids:
            raise ValueError("empty example")
        ids_t = torch.tensor(ids, dtype=torch.long)
        labels_t = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        return insert_gists(ids_t, self.config, labels=labels_t)

    def __call__(self, examples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("no examples to collate")
        items = [self._example(ex) for ex in examples]
        n = max(it["input_ids"].shape[0] for it in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        b = len(items)
        input_ids = torch.full((b, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, n), -100, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for i, it in enumerate(items):
            k = it["input_ids"].shape[0]
            input_ids[i, :k] = it["input_ids"]
            labels[i, :k] = it["labels"]
            mask[i, :k] = 1
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.arange(n).expand(b, n).contiguous(),
        }
        if self.return_attention_mask:
            out["attention_mask"] = mask
        return out
