"""Hugging Face models written as new GGUF files: read back, and run in llama.cpp with the same logits."""

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import FAST, _common, assert_clean_error, run_cli

from abliterate import AbliterateError
from abliterate.export.gguf_convert import write_gguf
from abliterate.model.load import load_model

CONVERTIBLE = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3"]


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def _tensor(path, name) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))



def _variant(name: str, tokenizer):
    """Llama variants the tiny set lacks: biases everywhere (what steering bakes), and scaled rope."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    extra = {"biases": dict(attention_bias=True, mlp_bias=True),
             "rope_llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
             "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0})}[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_common(len(tokenizer)), **extra)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@torch.no_grad()
@pytest.mark.parametrize("arch", CONVERTIBLE + ["biases", "rope_llama3", "rope_linear"])
def test_llama_cpp_runs_the_written_gguf_as_transformers_runs_the_model(arch, model_dirs, tokenizer, tmp_path,
                                                                       llama_cpp):
    """Same log-probabilities at every position (past the sliding window and the rope's original context)."""
    model = load_model(str(model_dirs[arch])).model if arch in model_dirs else _variant(arch, tokenizer)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(model, tokenizer, path, qtype="F32")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread at home? " * 6}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 64
    ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    got -= got.max(-1, keepdims=True)
    got -= np.log(np.exp(got).sum(-1, keepdims=True))
    assert np.abs(got - ref).max() < 5e-3


def test_written_gguf_holds_the_tokenizer_and_the_layout_facts(model_dirs, tokenizer, tmp_path):
    """Tokens, merges, special ids and template as the tokenizer has them; Gemma norms stored as 1 + w;
    Llama Q rows reordered to adjacent pairs; a tied head left out; matrices in the asked type."""
    llama = load_model(str(model_dirs["llama"])).model
    write_gguf(llama, tokenizer, tmp_path / "l.gguf", qtype="Q8_0")
    f = _fields(tmp_path / "l.gguf")
    vocab = tokenizer.get_vocab()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert [vocab[t] for t in f["tokenizer.ggml.tokens"]] == list(range(len(vocab)))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tokenizer.chat_template
    assert f["tokenizer.ggml.token_type"][vocab["<|im_end|>"]] == 3  # control
    assert f["llama.block_count"] == llama.config.num_hidden_layers
    reader = gguf.GGUFReader(str(tmp_path / "l.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types  # untied: its own head
    write_gguf(llama, tokenizer, tmp_path / "l32.gguf", qtype="F32")
    q = llama.model.layers[0].self_attn.q_proj.weight
    heads = llama.config.num_attention_heads
    want = q.reshape(heads, 2, -1, q.shape[1]).transpose(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(_tensor(tmp_path / "l32.gguf", "blk.0.attn_q.weight"), want.numpy())
    assert not torch.equal(want, q)

    gemma = load_model(str(model_dirs["gemma3_text"])).model
    write_gguf(gemma, tokenizer, tmp_path / "g.gguf", qtype="F32")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "g.gguf")).tensors}
    assert "output.weight" not in names  # tied: llama.cpp uses token_embd
    norm = gemma.model.layers[0].post_feedforward_layernorm.weight
    np.testing.assert_allclose(_tensor(tmp_path / "g.gguf", "blk.0.post_ffw_norm.weight"), norm.numpy() + 1)
    np.testing.assert_array_equal(_tensor(tmp_path / "g.gguf", "blk.0.attn_q.weight"),
                                  gemma.model.layers[0].self_attn.q_proj.weight.numpy())  # NeoX rope: as is


def test_convert_bad_input(capsys, model_dirs, tokenizer, tmp_path):

    for arch in ("phi3", "gpt2", "qwen3_moe"):
        code, _, err = run_cli(capsys, "convert", model_dirs[arch], "-o", tmp_path / "x.gguf")
        assert_clean_error(code, err, "is not supported", tmp_path / "x.gguf")
    code, _, err = run_cli(capsys, "convert", model_dirs["llama"], "-o", tmp_path / "x.gguf", "--gguf-type", "Q9_9")
    assert_clean_error(code, err, "unknown GGUF type 'Q9_9'", tmp_path / "x.gguf")
    code, _, err = run_cli(capsys, "convert", model_dirs["llama"], "-o", tmp_path / "x.bin")
    assert_clean_error(code, err, "should end in .gguf", tmp_path / "x.bin")
    code, _, err = run_cli(capsys, "convert", model_dirs["llama"], "-o", model_dirs["llama"] / "x.gguf")
    assert_clean_error(code, err, "inside the input model directory", model_dirs["llama"] / "x.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    code, _, err = run_cli(capsys, "convert", model_dirs["llama"], "-o", tmp_path / "exists.gguf")
    assert_clean_error(code, err, "pass --force")
    assert (tmp_path / "exists.gguf").read_bytes() == b"mine"
    with pytest.raises(AbliterateError, match="pre-tokenizer"):
        from abliterate.export.gguf_convert import _pre_name

        _pre_name({"type": "Whitespace"})


def test_run_writes_a_hugging_face_model_as_gguf_with_its_companions(capsys, model_dirs, tmp_path):

    out = tmp_path / "tiny.gguf"
    code, stdout, err = run_cli(capsys, "run", model_dirs["qwen2"], "-o", out, "--gguf-type", "Q8_0", *FAST)
    assert code == 0, err
    assert "with tokenizer and chat template" in stdout and "ollama create tiny" in stdout
    for companion in ("tiny.direction.safetensors", "tiny.manifest.json", "tiny.report.html", "tiny.Modelfile"):
        assert (tmp_path / companion).is_file()
    manifest = json.loads((tmp_path / "tiny.manifest.json").read_text())
    assert manifest["gguf"]["arch"] == "qwen2" and manifest["gguf"]["types"]["blk.0.ffn_down.weight"] == "Q8_0"
    # the written weights are the edited model's, not the original's
    edited = _tensor(out, "blk.1.attn_output.weight")
    original = load_model(str(model_dirs["qwen2"])).model.model.layers[1].self_attn.o_proj.weight.numpy()
    assert np.abs(edited - original).max() > 1e-3
