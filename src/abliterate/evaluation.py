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

from .activations import batches, forward, id_batches
from .refusal import is_refusal


@dataclass
class Generated:
    text: list[str]
    ids: list[list[int]]  # response token ids, EOS included, padding dropped
    logprobs: torch.Tensor | None = None  # (N, k, V) float32, log-softmax at the first k steps
    mask: torch.Tensor | None = None  # (N, k) bool, steps up to and including EOS


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate(model, tokenizer, texts: list[str], *, max_new_tokens: int, batch_size: int = 32,
             keep_logprobs: int = 0, desc: str | None = "generate") -> Generated:
    """Greedy answers to formatted `texts`, stopping when every answer in a batch has ended."""
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    text, ids = [None] * len(texts), [None] * len(texts)
    logprobs = mask = None
    if keep_logprobs:
        logprobs = torch.zeros(len(texts), keep_logprobs, model.config.get_text_config().vocab_size)
        mask = torch.zeros(len(texts), keep_logprobs, dtype=torch.bool)
    for batch in batches(tokenizer, texts, batch_size, device, desc):
        out = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos), return_dict_in_generate=True, output_logits=bool(keep_logprobs),
        )
        new = out.sequences[:, batch.input_ids.shape[1]:].cpu()  # (B, steps)
        for row, i in enumerate(batch.index):
            seq = new[row].tolist()
            end = next((t + 1 for t, tok in enumerate(seq) if tok in eos), len(seq))
            ids[i] = seq[:end]
            text[i] = tokenizer.decode(seq[:end], skip_special_tokens=True).strip()
            if keep_logprobs:
                k = min(keep_logprobs, len(out.logits), end)
                step = torch.stack([out.logits[t][row] for t in range(k)]).float().cpu()
                logprobs[i, :k, : step.shape[-1]] = torch.log_softmax(step, -1)
                mask[i, :k] = True
    return Generated(text, ids, logprobs, mask)


@torch.inference_mode()
def teacher_forced_kl(model, tokenizer, texts: list[str], ref: Generated, batch_size: int = 32) -> torch.Tensor:
    """KL(reference || model) at each of the first k steps of the reference answers, (N, k); 0 where masked."""
    k = ref.logprobs.shape[1]
    device = next(model.parameters()).device
    prompt_ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    # Feed the first k-1 answer tokens; the logits at the last k positions predict answer tokens 0..k-1.
    # Answers shorter than k are padded with their own EOS: those steps are masked out anyway.
    seqs = []
    for p, ans in zip(prompt_ids, ref.ids):
        cont = (ans + [ans[-1] if ans else tokenizer.pad_token_id] * k)[: k - 1]
        seqs.append(p + cont)
    kl = torch.zeros(len(texts), k)
    for batch in id_batches(seqs, tokenizer.pad_token_id, batch_size, device):
        logits = forward(model, batch, logits_to_keep=k).logits.float().cpu()  # (B, k, V)
        new = torch.log_softmax(logits, -1)
        for row, i in enumerate(batch.index):
            r = ref.logprobs[i, :, : new.shape[-1]]
            kl[i] = (r.exp() * (r - new[row])).sum(-1) * ref.mask[i]
    return kl


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

    def to_dict(self) -> dict:
        return {**asdict(self), "refusal_rate": self.refusal_rate, "over_refusal_rate": self.over_refusal_rate}


@dataclass
class Evaluation:
    metrics: Metrics
    harmful: Generated
    harmless: Generated
    harmful_prompts: list[str] = field(default_factory=list)
    harmless_prompts: list[str] = field(default_factory=list)

    def samples(self, n: int = 3) -> list[dict]:
        return [{"prompt": p, "response": r} for p, r in zip(self.harmful_prompts[:n], self.harmful.text[:n])]


def evaluate(model, tokenizer, harmful: list[str], harmless: list[str], *, harmful_prompts: list[str] = (),
             harmless_prompts: list[str] = (), reference: Evaluation | None = None, max_new_tokens: int = 32,
             kl_tokens: int = 16, batch_size: int = 32) -> Evaluation:
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
def answer_logprob(model, tokenizer, texts: list[str], answers: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Mean log-probability per token that `model` gives each answer after its prompt, (N,).

    Scored by the original model, this measures coherence of someone else's text:
    fluent answers (a refusal included) score near the model's own answers,
    word salad far below. The first token is left out (when there are others): it
    is the decision that steering changes on purpose ("I'm sorry" instead of "Sure"),
    and its surprise says nothing about whether the text that follows is fluent.
    """
    device = next(model.parameters()).device
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
