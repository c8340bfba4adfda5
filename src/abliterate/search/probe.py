"""A trial's cheap score: refusals counted in short greedy answers and first-token KL, on prompts whose shared
chat-template prefix is run once per trial."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import AbliterateError
from ..measure.decode import eos_ids, generate, greedy, split_prefix
from ..measure.kl import kl_logprobs
from ..measure.refusal import is_refusal, refusal_token_ids
from ..model.forward import cached_logits

log = logging.getLogger(__name__)


@dataclass
class Probe:
    """What a trial is scored against: token ids past a shared prefix, and the original's behaviour."""

    prefix: list[int]
    harmful: list[list[int]]  # suffixes after the prefix
    harmless: list[list[int]]  # suffixes, followed by the original's first answer tokens (k_steps - 1 of them)
    ref_logprobs: torch.Tensor  # (N, k_steps, V) the original's log-probabilities along its harmless answers
    ref_mask: torch.Tensor  # (N, k_steps)
    refusal_ids: list[int]
    baseline_refusals: int = 0
    pad_id: int = 0
    batch_size: int = 64
    answer_tokens: int = 12  # greedy answer length per trial
    eos: set[int] = field(default_factory=set)
    decode: object = None  # the tokenizer's decode

    @property
    def steps(self) -> int:
        return self.ref_logprobs.shape[1]


def make_probe(model, tokenizer, harmful: list[str], harmless: list[str], *, max_new_tokens: int,
               batch_size: int, steps: int = 4, answer_tokens: int = 12) -> Probe:
    """The original's behaviour on formatted search prompts: its refusal openings, and its harmless answers'
    first `steps` log-probabilities (for KL)."""
    gen_h = generate(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     desc="search: original on harmful")
    gen_s = generate(model, tokenizer, harmless, max_new_tokens=steps, batch_size=batch_size, keep_logprobs=steps,
                     desc="search: original on harmless")
    refused = [is_refusal(t) for t in gen_h.text]
    answered_first = {ids[0] for ids, r in zip(gen_h.ids, refused) if ids and not r}
    answered_first |= {ids[0] for ids in gen_s.ids if ids}
    learned = {ids[0] for ids, r in zip(gen_h.ids, refused) if ids and r}
    ids = sorted((learned | set(refusal_token_ids(tokenizer))) - answered_first)
    if not learned:
        log.warning("the original refused none of the %d search prompts; refusals are estimated from built-in "
                    "refusal openings only", len(harmful))
    if not ids:
        raise AbliterateError("no refusal opening token is left that the original does not also use to answer; "
                              "the refusal estimate would be empty. Use harmful prompts that this model refuses")
    h_ids, s_ids = (tokenizer(list(texts), add_special_tokens=False).input_ids for texts in (harmful, harmless))
    p = len(split_prefix(h_ids + s_ids)[0])
    # teacher forcing: the first steps - 1 answer tokens (EOS-padded answers are masked beyond their end)
    cont = [(a + [a[-1] if a else tokenizer.pad_token_id] * steps)[: steps - 1] for a in gen_s.ids]
    return Probe(
        prefix=h_ids[0][:p], harmful=[x[p:] for x in h_ids], harmless=[x[p:] + c for x, c in zip(s_ids, cont)],
        ref_logprobs=gen_s.logprobs, ref_mask=gen_s.mask, refusal_ids=ids,
        baseline_refusals=sum(refused), pad_id=tokenizer.pad_token_id, batch_size=batch_size,
        answer_tokens=answer_tokens, eos=eos_ids(model, tokenizer), decode=tokenizer.decode,
    )


@dataclass
class Score:
    refusals: float  # refusals counted in short answers, plus the mean refusal-opening probability (tie-break)
    kl: float  # mean KL at the first response token
    kl_steps: float  # mean KL over the first `steps` tokens
    counted: int = 0  # refusals counted in the short answers
    mass: float = 0.0  # expected refusal openings at the first token


def score(model, probe: Probe) -> Score:
    """The cheap objectives of whatever edit is active on `model` (hooks).

    Refusals: greedy answers of `answer_tokens` tokens checked for refusal markers (a refusal
    that opens with the topic, "Creating a fake ID is illegal...", is missed by any first-token
    estimate), plus the mean probability of the model's refusal openings, in [0, 1), which
    orders trials with the same count.
    """
    gen = greedy(model, probe.prefix, probe.harmful, max_new_tokens=probe.answer_tokens, pad_id=probe.pad_id,
                 eos=probe.eos, batch_size=probe.batch_size)
    answers, h = gen.ids, gen.first
    counted = sum(is_refusal(probe.decode(a, skip_special_tokens=True).strip()) for a in answers)
    p_refuse = torch.softmax(h, -1)[:, probe.refusal_ids].sum(-1)  # (N,)
    s = cached_logits(model, probe.prefix, probe.harmless, probe.steps, probe.pad_id, probe.batch_size)
    new = torch.log_softmax(s, -1)
    ref = probe.ref_logprobs[:, :, : new.shape[-1]]
    kl = kl_logprobs(ref, new) * probe.ref_mask  # (N, steps)
    mass = p_refuse.mean().item()
    return Score(counted + min(mass, 0.999), kl[:, 0].mean().item(), (kl.sum() / probe.ref_mask.sum()).item(),
                 counted, mass)
