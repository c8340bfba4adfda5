"""The greedy decoder: answers to formatted prompts, stopping when every answer in a batch has ended.

One loop serves every stage (the evaluation, the search's trials and finalists, steering's
measures). Prompts of one chat template share their opening tokens (system prompt and role
markers: 25 of 41 tokens on Qwen2.5), so that prefix is run once and its key/value cache is
repeated over each batch; the rest of each prompt is left padded after it, with position ids
counting real tokens only. Decoding is plain argmax: no repetition penalty or other logits
processor from the model's generation config, so an answer depends on the weights alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch

from ..model.forward import id_batches, input_device
from ..model.streamed import StreamedModel


@dataclass
class Generated:
    text: list[str]
    ids: list[list[int]]  # response token ids, EOS included, padding dropped
    logprobs: torch.Tensor | None = None  # (N, k, V) float32, log-softmax at the first k steps (streamed: on disk,
    # a `model.streamed.SpilledRows`; index it by row, logprobs[i])
    mask: torch.Tensor | None = None  # (N, k) bool, steps up to and including EOS
    first: torch.Tensor | None = None  # (N, V) float32 logits at the first step


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def split_prefix(ids: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The longest prefix all `ids` share (leaving at least one token each), and what follows it."""
    p = min(common_prefix(ids), min(len(x) for x in ids) - 1)
    return ids[0][:p], [x[p:] for x in ids]


@torch.inference_mode()
def greedy(model, prefix: list[int], suffixes: list[list[int]], *, max_new_tokens: int, pad_id: int,
           eos: set[int], batch_size: int, keep_logprobs: int = 0, desc: str | None = None) -> Generated:
    """Greedy answers after prefix + suffix (the prefix run once), token ids only (`text` left empty).

    Keeps the first step's logits (`first`), and with `keep_logprobs` the log-softmax of the first
    k steps with their mask. A batch stops when every row has produced an EOS token.
    """
    device = input_device(model)
    n_all = len(suffixes)
    answers: list[list[int]] = [[] for _ in suffixes]
    first = [None] * n_all
    logprobs = mask_k = None
    if keep_logprobs:
        logprobs = torch.zeros(n_all, keep_logprobs, model.config.get_text_config().vocab_size)
        mask_k = torch.zeros(n_all, keep_logprobs, dtype=torch.bool)
    cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values if prefix else None
    eos_t = torch.tensor(sorted(eos), device=device)
    for batch in id_batches(suffixes, pad_id, batch_size, device, desc):
        n = len(batch.index)
        mask = torch.cat([torch.ones(n, len(prefix), dtype=torch.long, device=device), batch.attention_mask], 1)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, len(prefix):]
        ids = batch.input_ids
        done = torch.zeros(n, dtype=torch.bool, device=device)
        out, kept = [], []
        for step in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                        logits_to_keep=1)
            past, logits = res.past_key_values, res.logits[:, -1].float()
            if step == 0:
                for row, i in enumerate(batch.index):
                    first[i] = logits[row].cpu()
            if step < keep_logprobs:
                kept.append(torch.log_softmax(logits, -1).cpu())
            nxt = logits.argmax(-1).masked_fill(done, pad_id)
            out.append(nxt)
            done |= torch.isin(nxt, eos_t)
            if done.all():
                break
            ids = nxt.unsqueeze(-1)
            mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long, device=device)], 1)
            pos = pos[:, -1:] + 1
        toks = torch.stack(out, 1).cpu()  # (n, steps)
        for row, i in enumerate(batch.index):
            seq = toks[row].tolist()
            end = next((t + 1 for t, tok in enumerate(seq) if tok in eos), len(seq))
            answers[i] = seq[:end]
            for t in range(min(len(kept), end)):
                logprobs[i, t, : kept[t].shape[-1]] = kept[t][row]
                mask_k[i, t] = True
    return Generated([""] * n_all, answers, logprobs, mask_k, torch.stack(first))


def generate(model, tokenizer, texts: list[str], *, max_new_tokens: int, batch_size: int, keep_logprobs: int = 0,
             desc: str | None = "generate") -> Generated:
    """Greedy answers to formatted `texts`, decoded; see `greedy` (`model` a `StreamedModel`: its `greedy`, the same
    loop one block at a time)."""
    prefix, suffixes = split_prefix(tokenizer(list(texts), add_special_tokens=False).input_ids)
    loop = model.greedy if isinstance(model, StreamedModel) else partial(greedy, model)
    gen = loop(prefix, suffixes, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id,
                 eos=eos_ids(model, tokenizer), batch_size=batch_size, keep_logprobs=keep_logprobs, desc=desc)
    gen.text = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in gen.ids]
    return gen
