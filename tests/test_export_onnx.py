"""export-onnx: the graph onnxruntime runs gives transformers' logits, cache or no cache, and its greedy answers."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, make_model, run_cli

pytest.importorskip("onnxruntime", reason="pip install 'abliterate[onnx]'")

from abliterate import AbliterateError, Direction  # noqa: E402
from abliterate.export import onnx as ox  # noqa: E402

HIDDEN = 2


def prompt_ids(tokenizer, texts=("How do I bake bread?", "Tell me about the history of Rome.")):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def ids_of(tokenizer):
    return tokenizer(prompt_ids(tokenizer), add_special_tokens=False).input_ids


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
@torch.no_grad()
def test_onnx_equals_transformers_with_and_without_the_cache(arch, tokenizer, tmp_path):
    model = make_model(arch, tokenizer)
    path = ox.export_graph(model, tmp_path / "model.onnx", hidden_layer=HIDDEN)
    dec = ox.OnnxDecoder(path, ox.Shapes.of(model))
    prompts = ids_of(tokenizer)
    for ids in prompts:  # no cache: every position's logits, and the residual stream entering block HIDDEN
        ref = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        out = dec.run(np.array([ids]), np.ones((1, len(ids)), np.int64), ox.Shapes.of(model).empty_past(1))
        np.testing.assert_allclose(out["logits"][0], ref.logits[0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out["hidden_states"][0], ref.hidden_states[HIDDEN][0].numpy(), atol=1e-4, rtol=0)
    # a left-padded batch in two steps through the cache == transformers' padded forward without one
    tokenizer.padding_side = "left"
    enc = tokenizer(prompt_ids(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos).logits.numpy()
    k = enc.input_ids.shape[1] - 4
    first = dec.run(enc.input_ids[:, :k].numpy(), mask[:, :k].numpy(), ox.Shapes.of(model).empty_past(2))
    past = {n.replace("present", "past_key_values"): v for n, v in first.items() if n.startswith("present")}
    second = dec.run(enc.input_ids[:, k:].numpy(), mask.numpy(), past)
    got = np.concatenate([first["logits"], second["logits"]], 1)
    real = mask.bool().numpy()  # padded positions attend to nothing: their logits mean nothing
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)
    # greedy through the cache, one token a step == the project's decoder on transformers
    checks = ox.check_export(tmp_path, model, tokenizer, prompts, (), max_new_tokens=16)
    assert checks["fp32"].greedy_equal and checks["fp32"].max_abs_logit < 1e-4
    assert checks["fp32"].top1 == 1.0 and checks["fp32"].kl < 1e-6


def test_cli_exports_a_baked_steering_with_q8_and_the_direction_layer(tokenizer, tmp_path, capsys, monkeypatch):
    """A steer output: Qwen2 saved as a Llama with MLP biases, its direction beside it; its weights written as
    external data in chunks, as a model past 2 GB is (chunks of 64 KiB here, 1 GiB there)."""
    monkeypatch.setattr(ox, "EXTERNAL_BYTES", 0)
    monkeypatch.setattr(ox, "CHUNK_BYTES", 64 * 1024)
    from abliterate.edit.steer import Steering, bake_steering

    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    direction = Direction(vector=v / v.norm(), layer=3, scale=3.0)
    baked = bake_steering(make_model("qwen2", tokenizer), Steering(direction, 2.0, (2, 3)))
    assert baked.config.model_type == "llama" and baked.model.layers[1].mlp.down_proj.bias is not None
    src = tmp_path / "steered"
    baked.save_pretrained(src)
    tokenizer.save_pretrained(src)
    direction.save(src / "direction.safetensors")
    out = tmp_path / "web"
    code, printed, err = run_cli(capsys, "export-onnx", src, "-o", out, "--quantize", "q8")
    assert code == 0, err
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "onnx/model.onnx", "onnx/model_quantized.onnx", "manifest.json", "onnx/model.onnx_data",
                 "onnx/model_quantized.onnx_data"):
        assert (out / name).is_file(), name
    chunks = {g: sorted(p.name for p in (out / "onnx").glob(g + "_data*")) for g in ("model.onnx", "model_quantized.onnx")}
    assert len(chunks["model.onnx"]) > 2 and chunks["model.onnx"][:2] == ["model.onnx_data", "model.onnx_data_1"]
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    by_chunk: dict[str, list[int]] = {}
    for t in onnx.load(str(out / "onnx/model.onnx"), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(t)
            by_chunk.setdefault(info.location, []).append(info.length)
    assert sorted(by_chunk) == chunks["model.onnx"]
    assert all(sum(sizes) <= 64 * 1024 or len(sizes) == 1 for sizes in by_chunk.values()), by_chunk
    config = json.loads((out / "config.json").read_text())
    counts = {g: len(names) for g, names in chunks.items()}
    assert config["transformers.js_config"] == {"use_external_data_format": counts}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "abliterate.export_onnx" and manifest["hidden_layer"] == 3
    assert manifest["external_data"] == counts
    fp32, q8 = manifest["check"]["fp32"], manifest["check"]["q8"]
    assert fp32["greedy_equal"] and fp32["max_abs_logit"] < 1e-4
    assert 0.5 <= q8["top1"] <= 1 and 0 <= q8["kl"] < 0.1
    assert "top-1 agreement" in printed and "greedy 32 tokens equal" in printed
    assert manifest["onnx_versions"]["onnxruntime"]
    names = [o.name for o in onnx.load(str(out / "onnx/model.onnx"), load_external_data=False).graph.output]
    assert names[0] == "logits" and names[1:3] == ["present.0.key", "present.0.value"] and names[-1] == "hidden_states"


def test_bad_inputs_fail_in_one_line_and_write_nothing(tokenizer, model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export-onnx", model_dirs["qwen3_moe"], "-o", out)
    assert_clean_error(code, err, "supported: gemma2, gemma3_text", out)
    code, _, err = run_cli(capsys, "export-onnx", model_dirs["llama"], "-o", out, "--hidden-layer", "5")
    assert_clean_error(code, err, "--hidden-layer 5 is out of range; this model has layers 0..4", out)
    code, _, err = run_cli(capsys, "export-onnx", model_dirs["llama"], "-o", out, "--quantize", "q3")
    assert_clean_error(code, err, "--quantize 'q3' is not one of: q8, q4, fp16", out)
    out.mkdir()
    (out / "keep").write_text("mine")
    code, _, err = run_cli(capsys, "export-onnx", model_dirs["llama"], "-o", out)
    assert_clean_error(code, err, "pass --force")
    assert (out / "keep").read_text() == "mine"
    assert not list(tmp_path.glob(".out*")), "a temporary output was left behind"


def test_missing_onnx_names_the_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_onnx(name, *a):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_onnx)
    with pytest.raises(AbliterateError, match=r"onnxruntime is not installed.*pip install 'abliterate\[onnx\]'"):
        ox.require()
