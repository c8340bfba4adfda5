"""Evaluation through llama.cpp itself (llama-cpp-python, optional): the proof that a GGUF we wrote works there.

The same measures as `evaluation`: refusals among greedy answers to harmful prompts,
over-refusals on harmless ones, and KL at the first answer token against the
original GGUF. Prompts are formatted by the model's own chat template (read from the
GGUF by transformers' tokenizer) and tokenized by llama.cpp with special tokens parsed.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import AbliterateError
from ..export.llamacpp import control_vector_layer
from .evaluation import Metrics
from .kl import kl_logprobs
from .refusal import is_refusal


def require():
    try:
        import llama_cpp  # optional ([llama]): it compiles llama.cpp, so it is imported only when used
    except Exception as e:
        raise AbliterateError(
            f"llama-cpp-python is not available ({e}); install it with pip install 'abliterate[llama]' "
            f"(it compiles llama.cpp, about 10 minutes on 2 cores)") from e
    return llama_cpp


def load(path: str | Path, n_ctx: int = 1024, lora: str | Path | None = None):
    llama_cpp = require()
    path = Path(path)
    for p in (path, lora):
        if p is not None and not Path(p).is_file():
            raise AbliterateError(f"{p} does not exist")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False,
                               logits_all=False, seed=0, lora_path=str(lora) if lora else None)
    except Exception as e:  # llama.cpp refuses the file
        raise AbliterateError(f"llama.cpp could not load {path} ({e})") from e


def tokens(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def answer(llm, text: str, max_new_tokens: int) -> str:
    """The greedy answer to a formatted prompt."""
    out = llm.create_completion(tokens(llm, text), max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    return out["choices"][0]["text"].strip()


def next_logprobs(llm, text: str) -> np.ndarray:
    """log-softmax of the logits after a formatted prompt, (V,)."""
    llm.reset()
    llm.eval(tokens(llm, text))
    return last_logprobs(llm)


def last_logprobs(llm) -> np.ndarray:
    """log-softmax of the logits after the last token evaluated, (V,)."""
    llama_cpp = require()
    # Read the context's last logits directly: without logits_all, `llm.scores` is not filled.
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)
    logits -= logits.max()
    return logits - np.log(np.exp(logits).sum())


def apply_control_vector(llm, vectors: dict[int, np.ndarray], scale: float) -> None:
    """Load a control vector into the context, as `--control-vector-scaled` does (our layer -> vector)."""
    llama_cpp = require()
    n_embd = llm.n_embd()
    n_layer = int(llm.metadata[f"{llm.metadata['general.architecture']}.block_count"])
    data = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)  # llama.cpp's layout: blocks 1 .. n_layer - 1
    for layer, v in vectors.items():
        n = control_vector_layer(layer, n_layer)
        data[(n - 1) * n_embd: n * n_embd] += scale * np.asarray(v, dtype=np.float32)
    fn = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
    ctx = llm._ctx.ctx
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if fn(ctx, ptr, data.size, n_embd, 1, n_layer - 1) != 0:
        raise AbliterateError("llama.cpp refused the control vector")


def evaluate(edited: str | Path, original: str | Path | None, harmful: list[str], harmless: list[str], *,
             max_new_tokens: int, control_vector: dict[int, np.ndarray] | None = None,
             control_scale: float = 1.0, lora: str | Path | None = None) -> tuple[Metrics, Metrics | None, dict]:
    """Metrics of `edited` (and of `original`, with KL against it) on formatted prompts, in llama.cpp.

    `control_vector` and `lora` apply to `edited` only.
    """
    def run(path, cvec=None, lora=None):
        llm = load(path, lora=lora)
        if cvec:
            apply_control_vector(llm, cvec, control_scale)
        h = [answer(llm, t, max_new_tokens) for t in tqdm(harmful, desc="llama.cpp harmful", leave=False)]
        s, lp = [], []
        for t in tqdm(harmless, desc="llama.cpp harmless", leave=False):
            lp.append(next_logprobs(llm, t))  # the prompt is now in the cache: answer() reuses it
            s.append(answer(llm, t, max_new_tokens))
        del llm
        return h, s, lp

    h, s, lp = run(edited, control_vector, lora)
    metrics = Metrics(sum(map(is_refusal, h)), len(h), sum(map(is_refusal, s)), len(s))
    answers = {"harmful": h, "harmless": s}
    before = None
    if original is not None:
        oh, os_, olp = run(original)
        before = Metrics(sum(map(is_refusal, oh)), len(oh), sum(map(is_refusal, os_)), len(os_), 0.0)
        kl = [float(kl_logprobs(torch.from_numpy(a), torch.from_numpy(b))) for a, b in zip(olp, lp)]
        metrics.kl_first = float(np.mean(kl))
        answers.update(original_harmful=oh, original_harmless=os_)
    return metrics, before, answers
