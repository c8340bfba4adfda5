"""Running a model over many prompts: left-padded batches, a forward pass that keeps only the last logits, and
the shared-prefix key/value cache (every prompt of a chat template starts with the same tokens)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import sliding_window


def first_param(model: nn.Module) -> nn.Parameter:
    """A parameter of `model`: where it lives (`.device`) and the dtype it computes in (`.dtype`). A streamed
    model's skeleton (`model.streamed`) has most of its weights on the meta device: the first real one counts."""
    first = next(model.parameters())
    return next((p for p in model.parameters() if not p.is_meta), first) if first.is_meta else first


def input_device(model: nn.Module) -> torch.device:
    """Where `model`'s inputs go: its first real parameter's device; the CPU when every parameter is on the meta
    device (a model accelerate offloaded whole: its hooks move the inputs to where each block runs)."""
    p = first_param(model)
    return torch.device("cpu") if p.is_meta else p.device


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


@torch.inference_mode()
def last_logits(model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    """Next-token logits after each text, (N, V) float32 on CPU, in input order."""
    device = input_device(model)
    out = [None] * len(texts)
    for batch in batches(tokenizer, texts, batch_size, device):
        logits = forward(model, batch).logits[:, -1].float().cpu()
        for row, i in enumerate(batch.index):
            out[i] = logits[row]
    return torch.stack(out)


@torch.inference_mode()
def cached_logits(model, prefix: list[int], suffixes: list[list[int]], keep: int, pad_id: int,
                  batch_size: int) -> torch.Tensor:
    """Logits at the last `keep` positions of prefix + suffix, (N, keep, V) float32 on CPU, input order.

    The prefix is run once; its key/value cache is repeated over each batch. Batches are left
    padded between prefix and suffix (masked), with positions counting real tokens only.
    """
    device = input_device(model)
    out = [None] * len(suffixes)
    cache = None
    if prefix:
        # logits_to_keep=1: the prefix's own logits are not used, and a full-vocabulary projection of a long prefix
        # (5 MMLU exemplars: ~700 tokens x 152k vocabulary on Qwen2.5) costs as much as a fifth of its forward pass
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1).past_key_values
    window = sliding_window(model)
    for batch in id_batches(suffixes, pad_id, batch_size, device):
        if cache is not None and window is not None and len(prefix) + batch.input_ids.shape[1] > window:
            whole = next(id_batches([prefix + suffixes[i] for i in batch.index], pad_id, len(batch.index), device))
            logits = forward(model, whole, logits_to_keep=keep).logits
            batch = Batch([batch.index[i] for i in whole.index], whole.input_ids, whole.attention_mask)
        elif cache is None:
            logits = forward(model, batch, logits_to_keep=keep).logits
        else:
            n = len(batch.index)
            mask = torch.cat([torch.ones(n, len(prefix), dtype=torch.long, device=device), batch.attention_mask], 1)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, len(prefix):]
            logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                           use_cache=True, logits_to_keep=keep).logits
        logits = logits.float().cpu()
        for row, i in enumerate(batch.index):
            out[i] = logits[row]
    return torch.stack(out)
