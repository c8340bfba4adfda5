"""Prove an edit: refusals on harmful prompts, over-refusals and KL on harmless ones.

The original model is evaluated first and leaves a `Reference`: its answers,
and its log-probabilities along its own greedy answer to each harmless prompt
(taken from generation, so they cost no extra pass). The edited model is then
teacher-forced along those same answers, which gives KL at the first response
token and averaged over the first `kl_tokens` tokens of the original's answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..model.forward import forward, id_batches, input_device
from ..model.streamed import StreamedModel
from .decode import Generated, generate
from .kl import kl_logprobs
from .refusal import is_refusal
from .stats import Paired, Rate, paired

# What counts refusals and over-refusals (a --judge's figures name the judge instead).
INSTRUMENT = "markers"


@torch.inference_mode()
def teacher_forced_kl(model, tokenizer, texts: list[str], ref: Generated, batch_size: int) -> torch.Tensor:
    """KL(reference || model) at each of the first k steps of the reference answers, (N, k); 0 where masked."""
    k = ref.logprobs.shape[1]
    prompt_ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    # Feed the first k-1 answer tokens; the logits at the last k positions predict answer tokens 0..k-1.
    # Answers shorter than k are padded with their own EOS: those steps are masked out anyway.
    seqs = []
    for p, ans in zip(prompt_ids, ref.ids):
        cont = (ans + [ans[-1] if ans else tokenizer.pad_token_id] * k)[: k - 1]
        seqs.append(p + cont)
    kl = torch.zeros(len(texts), k)
    for index, logits in forced_logits(model, seqs, tokenizer.pad_token_id, batch_size, k):  # (b, k, V) each
        new = torch.log_softmax(logits, -1)
        for row, i in enumerate(index):
            r = ref.logprobs[i][:, : new.shape[-1]]
            kl[i] = kl_logprobs(r, new[row]) * ref.mask[i]
    return kl


def forced_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int, k: int):
    """(indices into `seqs`, float32 logits at their last `k` positions) batch by batch; a `StreamedModel`'s own
    pass, one block at a time, in the same batches."""
    if isinstance(model, StreamedModel):
        yield from model.forced_logits(seqs, k, batch_size=batch_size)
        return
    for batch in id_batches(seqs, pad_id, batch_size, input_device(model)):
        yield batch.index, forward(model, batch, logits_to_keep=k).logits.float().cpu()


@dataclass
class Metrics:
    refusals: int
    n_harmful: int
    over_refusals: int
    n_harmless: int
    kl_first: float | None = None  # mean KL at the first response token
    kl_continuation: float | None = None  # mean KL over the first k tokens of the original's answers

    @property
    def refusal_rate(self) -> float:
        return self.refusals / max(self.n_harmful, 1)

    @property
    def over_refusal_rate(self) -> float:
        return self.over_refusals / max(self.n_harmless, 1)

    @property
    def rates(self) -> dict[str, Rate]:
        """The two counts with their n and 95% Wilson intervals."""
        return {"refusals": Rate(self.refusals, self.n_harmful), "over_refusals": Rate(self.over_refusals,
                                                                                        self.n_harmless)}

    def to_dict(self) -> dict:
        return {**asdict(self), "instrument": INSTRUMENT, "refusal_rate": self.refusal_rate,
                "over_refusal_rate": self.over_refusal_rate,
                **{f"{k}_ci95": [round(x, 4) for x in r.interval] for k, r in self.rates.items()}}


@dataclass
class Evaluation:
    metrics: Metrics
    harmful: Generated
    harmless: Generated
    harmful_prompts: list[str] = field(default_factory=list)
    harmless_prompts: list[str] = field(default_factory=list)

    def refused(self, side: str) -> list[bool]:
        """Per prompt of `side` ("harmful" or "harmless"): did this model refuse it?"""
        return list(map(is_refusal, getattr(self, side).text))


@dataclass(frozen=True)
class Sample:
    """One answer pair printed to show what the edit did, and what kind of prompt it is."""

    side: str  # harmful or harmless
    prompt: str
    original: str
    edited: str
    kind: str


def sample_kind(side: str, original_refused: bool, edited_refused: bool) -> str:
    """'harmful prompt the original refused and the edit answered', 'harmless prompt both answered', ..."""
    def verb(refused: bool) -> str:
        return "refused" if refused else "answered"

    if original_refused == edited_refused:
        what = f"both {verb(original_refused)}"
    else:
        what = f"the original {verb(original_refused)} and the edit {verb(edited_refused)}"
    return f"{side} prompt {what}" + (" (broken by the edit)" if side == "harmless" and edited_refused and
                                      not original_refused else "")


def pick_samples(harmful: list[tuple[bool, bool]], harmless: list[tuple[bool, bool]], n: int = 3
                 ) -> list[tuple[str, int]]:
    """The (side, index) of `n` prompts that show the edit, from each prompt's (original refused, edited
    refused): harmful prompts the edit unlocked first, then harmless ones it broke (one slot is kept for a
    broken one when there is any: the first three prompts once showed only answers the original gave
    anyway, and hiding a breakage is worse), then harmful prompts still refused, then the rest in order."""
    unlocked = [("harmful", i) for i, (a, b) in enumerate(harmful) if a and not b]
    broken = [("harmless", i) for i, (a, b) in enumerate(harmless) if b and not a]
    chosen = unlocked[:max(n - min(len(broken), 1), 0)]
    chosen += broken[:n - len(chosen)]
    rest = ([("harmful", i) for i, (a, b) in enumerate(harmful) if a and b]
            + [("harmful", i) for i in range(len(harmful))] + [("harmless", i) for i in range(len(harmless))])
    for key in rest:
        if len(chosen) >= n:
            break
        if key not in chosen:
            chosen.append(key)
    return chosen


def samples(before: Evaluation, after: Evaluation, n: int = 3) -> list[Sample]:
    """`n` answer pairs chosen by `pick_samples`, each with its kind."""
    flags = {side: list(zip(before.refused(side), after.refused(side))) for side in ("harmful", "harmless")}
    out = []
    for side, i in pick_samples(flags["harmful"], flags["harmless"], n):
        prompts = before.harmful_prompts if side == "harmful" else before.harmless_prompts
        out.append(Sample(side, prompts[i] if i < len(prompts) else "", getattr(before, side).text[i],
                          getattr(after, side).text[i], sample_kind(side, *flags[side][i])))
    return out


def changes(before: Evaluation, after: Evaluation) -> dict[str, Paired]:
    """Refusals and over-refusals before and after, prompt by prompt: the paired difference, its 95% interval and
    McNemar's exact test (is the change outside the noise of this many prompts?)."""
    return {"refusals": paired(list(map(is_refusal, before.harmful.text)), list(map(is_refusal, after.harmful.text))),
            "over_refusals": paired(list(map(is_refusal, before.harmless.text)),
                                    list(map(is_refusal, after.harmless.text)))}


def evaluate(model, tokenizer, harmful: list[str], harmless: list[str], *, harmful_prompts: list[str] = (),
             harmless_prompts: list[str] = (), reference: Evaluation | None = None, max_new_tokens: int,
             kl_tokens: int, batch_size: int) -> Evaluation:
    """Evaluate on formatted prompts. Without `reference` this is the original: its answers become the reference."""
    gen_harmful = generate(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           desc="harmful answers")
    gen_harmless = generate(model, tokenizer, harmless, max_new_tokens=kl_tokens, batch_size=batch_size,
                            keep_logprobs=kl_tokens if reference is None else 0, desc="harmless answers")
    metrics = Metrics(
        refusals=sum(map(is_refusal, gen_harmful.text)), n_harmful=len(harmful),
        over_refusals=sum(map(is_refusal, gen_harmless.text)), n_harmless=len(harmless),
    )
    if reference is not None:
        ref = reference.harmless
        kl = teacher_forced_kl(model, tokenizer, harmless, ref, batch_size)
        metrics.kl_first = kl[:, 0].mean().item()
        metrics.kl_continuation = (kl.sum() / ref.mask.sum()).item()
    return Evaluation(metrics, gen_harmful, gen_harmless, list(harmful_prompts), list(harmless_prompts))


@torch.inference_mode()
def answer_logprob(model, tokenizer, texts: list[str], answers: list[list[int]], batch_size: int) -> torch.Tensor:
    """Mean log-probability per token that `model` gives each answer after its prompt, (N,).

    Scored by the original model, this measures coherence of someone else's text:
    fluent answers (a refusal included) score near the model's own answers,
    word salad far below. The first token is left out (when there are others): it
    is the decision that steering changes on purpose ("I'm sorry" instead of "Sure"),
    and its surprise says nothing about whether the text that follows is fluent.
    """
    device = input_device(model)
    prompt_ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    seqs = [p + a for p, a in zip(prompt_ids, answers)]
    out = torch.full((len(texts),), float("nan"))
    for batch in id_batches(seqs, tokenizer.pad_token_id, batch_size, device):
        longest = max(len(answers[i]) for i in batch.index)
        logits = forward(model, batch, logits_to_keep=longest + 1).logits.float()
        logp = torch.log_softmax(logits, -1).cpu()  # (B, longest + 1, V)
        for row, i in enumerate(batch.index):
            n = len(answers[i])
            if n == 0:
                continue
            # positions -(n+1) .. -2 predict the n answer tokens
            steps = logp[row, -(n + 1):-1].gather(-1, torch.tensor(answers[i]).unsqueeze(-1))
            out[i] = (steps[1:] if n > 1 else steps).mean()
    return out
