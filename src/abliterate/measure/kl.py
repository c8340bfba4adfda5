"""KL divergence of an edited model from the original: the one implementation every stage uses.

KL(original || edited) over the next-token distribution: selection scores candidates by it at the
first response token, the search scores trials by it, the evaluation reports it at the first token
and along the original's answers, and verify-gguf measures it inside llama.cpp.
"""

from __future__ import annotations

import torch


def kl_logprobs(ref: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """KL(ref || new) over the last axis, from log-probabilities (any float dtype; no renormalisation)."""
    return (ref.exp() * (ref - new)).sum(-1)


def kl_div(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || new) over the last axis, from logits (computed in float32)."""
    return kl_logprobs(torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1))
