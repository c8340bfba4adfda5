"""run --stream's evaluation: greedy answers and teacher-forced KL one decoder block at a time are the in-memory ones.

Tiny random models saved in many small shards: the streamed generation gives the in-memory answers token for
token with the same kept log-probabilities (asserted within 1e-5), and the streamed teacher-forced KL is the
in-memory one (within 1e-6), for an original read from its shards and an edited model read from the shards
`apply --stream` writes; `run --stream` end to end gives the in-memory run's figures and baked tensors; a
budget too small for the key/value cache stops with the smallest budget that works.
"""

import json
import math

import pytest
import torch
from conftest import FAST, assert_clean_error, make_model, run_cli
from safetensors.torch import load_file

from abliterate.config import RunConfig
from abliterate.edit.project import ablated
from abliterate.export.streamed import open_skeleton
from abliterate.find.directions import Direction
from abliterate.measure.decode import generate
from abliterate.measure.evaluation import evaluate, teacher_forced_kl
from abliterate.model.streamed import StreamedModel

SHARD = "40KB"  # the tiny models (about 1 MB) in 10 to 30 shards
ARCHS = ["llama", "qwen2", "gemma3_text", "gpt2"]


def _texts(tokenizer, n=7):
    words = ["bread", "history of Rome", "a poem", "2 + 2", "the weather on Mars", "chess openings", "tea", "rust"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {w}" + " please" * (i % 3)}],
                                          tokenize=False, add_generation_prompt=True)
            for i, w in enumerate((words * 2)[:n])]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    """arch -> (in-memory model, its directory saved in many small shards)."""
    root = tmp_path_factory.mktemp("sharded")
    cache = {}

    def get(arch):
        if arch not in cache:
            model = make_model(arch, tokenizer)
            model.save_pretrained(root / arch, max_shard_size=SHARD)
            tokenizer.save_pretrained(root / arch)
            assert len(list((root / arch).glob("model-*.safetensors"))) >= 3
            cache[arch] = model, root / arch
        return cache[arch]
    return get


def _same_generation(streamed, memory):
    assert streamed.ids == memory.ids and streamed.text == memory.text
    if memory.logprobs is None:
        assert streamed.logprobs is None
        return
    assert torch.equal(streamed.mask, memory.mask)
    assert streamed.logprobs.shape == tuple(memory.logprobs.shape)
    for i in range(len(memory.ids)):
        assert (streamed.logprobs[i] - memory.logprobs[i]).abs().max().item() <= 1e-5, i


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_generation_is_the_in_memory_generation(arch, sharded, tokenizer):
    model, path = sharded(arch)
    texts = _texts(tokenizer)
    sm = StreamedModel(open_skeleton(path, RunConfig()), batch_size=3)
    for keep, new in ((0, 6), (4, 4)):
        kw = dict(max_new_tokens=new, batch_size=3, keep_logprobs=keep, desc=None)
        memory, streamed = generate(model, tokenizer, texts, **kw), generate(sm, tokenizer, texts, **kw)
        assert max(map(len, memory.ids)) > 1
        _same_generation(streamed, memory)
    assert all(p.is_meta for b in sm.blocks for p in b.parameters() if p.dim() > 1), "a block was left loaded"


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_kl_is_the_in_memory_kl(arch, sharded, tokenizer):
    """Teacher-forced along the original's answers, under an ablation's hooks (an edited model)."""
    model, path = sharded(arch)
    texts = _texts(tokenizer)
    ref = generate(model, tokenizer, texts, max_new_tokens=4, batch_size=3, keep_logprobs=4, desc=None)
    sm = StreamedModel(open_skeleton(path, RunConfig()), batch_size=3)
    torch.manual_seed(1)
    hidden = model.config.get_text_config().hidden_size
    d = Direction(torch.nn.functional.normalize(torch.randn(hidden), dim=0), layer=1)
    with ablated(model, d):
        memory = teacher_forced_kl(model, tokenizer, texts, ref, 3)
    with ablated(sm.model, d):
        streamed = teacher_forced_kl(sm, tokenizer, texts, ref, 3)
    assert memory.abs().max() > 0
    assert (streamed - memory).abs().max().item() <= 1e-6
