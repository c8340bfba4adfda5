"""run --stream's evaluation: greedy answers and teacher-forced KL one decoder block at a time are the in-memory ones.

Tiny random models saved in many small shards: the streamed generation gives the in-memory answers token for
token with the same kept log-probabilities (asserted within 1e-5), and the streamed teacher-forced KL is the
in-memory one (within 1e-6), for an original read from its shards and an edited model read from the shards
`apply --stream` writes; `run --stream` end to end gives the in-memory run's figures and baked tensors; a
budget too small for the key/value cache stops with the smallest budget that works.
"""

import contextlib
import json
import math

import pytest
import torch
from conftest import ARCHS as ALL
from conftest import FAST, assert_clean_error, run_cli
from safetensors.torch import load_file

from abliterate.config import RunConfig
from abliterate.edit.project import ablated
from abliterate.export.streamed import open_skeleton
from abliterate.find.directions import Direction
from abliterate.measure.decode import generate
from abliterate.measure.evaluation import teacher_forced_kl
from abliterate.model.streamed import StreamedModel

ARCHS = [a for a in ALL if a != "qwen3_moe"]  # fused experts: the stream refuses them (test_streamed_find.py)


def _texts(tokenizer, n=7):
    """Chat prompts of 19 to about 50 tokens: some longer than Gemma's sliding window (32) before they answer."""
    words = ["bread", "history of Rome", "a poem", "2 + 2", "the weather on Mars", "chess openings", "tea", "rust"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {w}" + " please" * (i % 3)
                                           + " Explain it step by step, with examples." * (i % 3)}],
                                          tokenize=False, add_generation_prompt=True)
            for i, w in enumerate((words * 2)[:n])]


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
        kw = {"max_new_tokens": new, "batch_size": 3, "keep_logprobs": keep, "desc": None}
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


@pytest.mark.parametrize("arch,protocol,shots", [("llama", "letter", 2), ("qwen2", "cloze", 0),
                                                 ("gemma3_text", "cloze", 1)])
def test_streamed_capability_is_the_in_memory_capability(arch, protocol, shots, sharded, tokenizer):
    """Every question's choices whole in one streamed pass score as `score` does with its prefix cache: the same
    choices, log-likelihoods within 1e-4, under an ablation's hooks too."""
    from abliterate.measure import capability

    model, path = sharded(arch)
    items, dev = capability.quick_items()  # one subject's (the fast tier's autouse fixture)
    sm = StreamedModel(open_skeleton(path, RunConfig()), batch_size=3)
    hidden = model.config.get_text_config().hidden_size
    d = Direction(torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(2)),
                                                dim=0), layer=1)
    for edit in (False, True):
        with ablated(model, d) if edit else contextlib.nullcontext(), \
                ablated(sm.model, d) if edit else contextlib.nullcontext():
            memory = capability.score(model, tokenizer, items, shots=shots, dev_items=dev, protocol=protocol)
            streamed = capability.score_streamed(sm, tokenizer, items, shots=shots, dev_items=dev, protocol=protocol)
        assert streamed.predicted == memory.predicted
        assert max(abs(a - b) for x, y in zip(streamed.logprobs, memory.logprobs) for a, b in zip(x, y)) <= 1e-4
        assert len({round(lp, 3) for row in memory.logprobs for lp in row}) > len(items)  # the choices differ


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "direction.safetensors":
            out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_run_stream_is_the_in_memory_run(arch, capsys, caplog, tmp_path, sharded):
    """run --stream never loads the model: the same chosen layer, the same figures before and after (counts, KL),
    the same answers, the same capability answers (the quick check's items of one subject, each model), and the in-memory run's
    baked tensors bit for bit."""
    _, src = sharded(arch)
    code, _, err = run_cli(capsys, "run", src, "-o", tmp_path / "memory", *FAST)
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", src, "-o", tmp_path / "stream", *FAST, "--stream")
    assert code == 0, err
    for line in ("activations and selection: streamed", "evaluate original: streamed",
                 "orthogonalize and save: streamed, shard by shard", "evaluate edited: streamed",
                 "capability: streamed"):
        assert line in caplog.text, line
    assert "how each stage ran:" in out
    ma, mb = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("memory", "stream"))
    ca, cb = ({k: v for k, v in m["capability"].items() if not k.startswith("seconds")} for m in (ma, mb))
    assert ca == cb and ca["n"] >= 2, (ca, cb)  # accuracies, items lost and gained, intervals: all equal
    assert f"capability ({ca['n']} items)" in out
    assert "What it cost" in (tmp_path / "stream" / "report.html").read_text()
    assert ma["direction"]["layer"] == mb["direction"]["layer"]
    for side in ("before", "after"):
        a, b = ma["metrics"][side], mb["metrics"][side]
        assert (a["refusals"], a["over_refusals"], a["n_harmful"]) == (b["refusals"], b["over_refusals"],
                                                                       b["n_harmful"])
        for k in ("kl_first", "kl_continuation"):
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or math.isclose(a[k], b[k], abs_tol=1e-6)), k
    assert ma["metrics"]["after"]["kl_first"] > 0
    ga, gb = (json.loads((tmp_path / name / "generations.json").read_text()) for name in ("memory", "stream"))
    assert ga == gb
    baked, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert baked.keys() == streamed.keys()
    assert all(torch.equal(baked[n], streamed[n]) for n in baked)
    original = _tensors(src)
    assert any(n in original and not torch.equal(original[n], streamed[n]) for n in streamed), "nothing was baked"


def test_run_stream_without_output_evaluates_the_edit(capsys, caplog, tmp_path, sharded):
    _, src = sharded("llama")
    code, out, err = run_cli(capsys, "run", src, *FAST, "--stream", "--capability", "none")
    assert code == 0, err
    assert "into a temporary directory, removed" in caplog.text and "capability" not in out.split("how each")[0]


def test_budget_too_small_for_the_key_value_cache(capsys, tmp_path, sharded):
    """A budget that holds the find stages' batches but not a generation's cache stops before any block is read,
    naming the smallest budget that works; with that budget the run goes through."""
    _, src = sharded("llama")
    sm = StreamedModel(open_skeleton(src, RunConfig()), batch_size=3)
    find_need = sm.budget.needed(3 * 70, 3 * 70, 70)  # the longest find prompt is under 70 tokens
    args = [*FAST, "--batch-size", "3", "--max-new-tokens", "64", "--capability", "none"]
    code, _, err = run_cli(capsys, "directions", src, "-o", tmp_path / "d.safetensors", "--n-train", "8",
                           "--n-select", "4", "--batch-size", "3", "--max-memory", f"{find_need}B", "--stream")
    assert code == 0, err  # the find stages fit
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", src, "-o", out, *args, "--max-memory", f"{find_need}B", "--stream")
    assert_clean_error(code, err, "with its key/value cache for 64 new tokens: the smallest budget that works is", out)
    smallest = err.split("the smallest budget that works is ")[1].split(" ")[0]
    code, _, err = run_cli(capsys, "run", src, "-o", out, *args, "--max-memory", smallest, "--stream")
    assert code == 0, err
