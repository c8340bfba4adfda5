"""Residual-stream activations at every layer, at the last prompt positions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .arch import text_config


@dataclass
class Batch:
    index: list[int]  # positions of these texts in the caller's list
    input_ids: torch.Tensor  # (B, T), left padded
    attention_mask: torch.Tensor  # (B, T)


def batches(tokenizer, texts: list[str], batch_size: int, device, desc: str | None = None) -> Iterator[Batch]:
    """Left-padded batches of the tokenized `texts`; see `id_batches`."""
    ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    yield from id_batches(ids, tokenizer.pad_token_id, batch_size, device, desc)


def id_batches(ids: list[list[int]], pad: int, batch_size: int, device, desc: str | None = None) -> Iterator[Batch]:
    """Left-padded batches of similar length (sorted), with their original indices.

    Sorting by length keeps padding, and so wasted compute, small.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    steps = range(0, len(order), batch_size)
    for start in tqdm(steps, desc=desc, disable=desc is None, leave=False, unit="batch"):
        index = order[start:start + batch_size]
        width = max(len(ids[i]) for i in index)
        input_ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            n = len(ids[i])
            input_ids[row, width - n:] = torch.tensor(ids[i])
            mask[row, width - n:] = 1
        yield Batch(index, input_ids.to(device), mask.to(device))


def forward(model, batch: Batch, **kwargs):
    """One forward pass that returns logits only for the last position (cheap: no full vocab projection).

    Position ids count real tokens only, so a left-padded prompt sees the same
    positions as it would alone (this matters for absolute position embeddings, as in GPT-2).
    """
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                 use_cache=False, logits_to_keep=kwargs.pop("logits_to_keep", 1), **kwargs)


@dataclass
class Activations:
    """Mean residual stream entering each block, at the last `n_positions` tokens.

    `mean` is (layers, positions, hidden) in float64: summing thousands of
    float32 activations with norms in the hundreds loses digits that a
    difference of two close means needs. `per_prompt` (N, layers, positions,
    hidden) float32 is kept only when asked.
    """

    mean: torch.Tensor
    count: int
    tokens: int = 0  # real (unpadded) tokens processed
    per_prompt: torch.Tensor | None = None


@torch.inference_mode()
def collect(model, tokenizer, texts: list[str], *, n_positions: int, batch_size: int = 32,
            keep: bool = False, desc: str | None = "activations") -> Activations:
    n_layers = text_config(model).num_hidden_layers
    device = next(model.parameters()).device
    total, tokens = None, 0
    kept = [None] * len(texts) if keep else None
    for batch in batches(tokenizer, texts, batch_size, device, desc):
        out = forward(model, batch, output_hidden_states=True)
        tokens += int(batch.attention_mask.sum())
        # hidden_states[l] is the input of block l; the last entry (after the
        # final norm in most models) is not a block input and is left out.
        resid = torch.stack(out.hidden_states[:n_layers], dim=1)[:, :, -n_positions:, :]  # (B, L, P, H)
        s = resid.double().sum(0)
        total = s if total is None else total + s
        if keep:
            for row, i in enumerate(batch.index):
                kept[i] = resid[row].float().cpu()
    mean = (total / len(texts)).cpu()
    assert torch.isfinite(mean).all(), "non-finite activations: check the model's dtype (try --dtype float32)"
    return Activations(mean, len(texts), tokens, torch.stack(kept) if keep else None)
