"""The edit as a PEFT LoRA adapter: merged, it is the baked model; unmerged, it runs like it."""

import pytest
import torch
from conftest import assert_clean_error, run_cli

from abliterate import AbliterateError, Direction, orthogonalize_, resolve
from abliterate.model.load import load_model

peft = pytest.importorskip("peft", reason="the adapter export needs peft (pip install 'abliterate[peft]')")


def _direction(hidden: int, layer: int = 2) -> Direction:
    g = torch.Generator().manual_seed(3)
    return Direction(torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0), layer=layer)


def _export_adapter(capsys, tmp_path, src):
    """`apply --adapter` on `src` with a fixed random direction: (loaded original, layout, direction)."""
    base = load_model(str(src))
    layout = resolve(base.model)
    d = _direction(layout.hidden_size)
    d.save(tmp_path / "d.safetensors")
    code, _, err = run_cli(capsys, "apply", src, "--direction", tmp_path / "d.safetensors", "-o",
                           tmp_path / "adapter", "--adapter")
    assert code == 0, err
    return base, layout, d


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_merged_adapter_equals_baked_weights(capsys, tmp_path, model_dirs, arch):
    from transformers import AutoModelForCausalLM

    src = model_dirs[arch]
    base, layout, d = _export_adapter(capsys, tmp_path, src)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    # Fewer bytes than the model: two vectors per writer.
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < sum(p.stat().st_size for p in src.glob("*.safetensors"))
    fresh = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload()
    orthogonalize_(base.model, d, layout)
    baked = dict(base.model.named_parameters())
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, baked[name], rtol=1e-5, atol=1e-5, msg=name)


@torch.no_grad()
def test_unmerged_adapter_on_a_tied_model_runs_like_the_baked_model(capsys, tmp_path, model_dirs):
    """Tied head: the adapter changes embedding lookups only, as the baked (untied) model does."""
    from transformers import AutoModelForCausalLM

    src = model_dirs["llama_tied"]
    base, layout, d = _export_adapter(capsys, tmp_path, src)
    ids = base.tokenizer(["Write a poem about bread."], return_tensors="pt").input_ids
    fresh = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    orthogonalize_(base.model, d, layout)
    torch.testing.assert_close(with_adapter(ids).logits, base.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,match", [("gpt2", "Conv1D"), ("qwen3_moe", "fused experts")])
def test_edits_lora_cannot_express_are_refused(capsys, tmp_path, model_dirs, arch, match):
    base = load_model(str(model_dirs[arch]))
    _direction(resolve(base.model).hidden_size).save(tmp_path / "d.safetensors")
    code, _, err = run_cli(capsys, "apply", model_dirs[arch], "--direction", tmp_path / "d.safetensors", "-o",
                           tmp_path / "adapter", "--adapter")
    assert_clean_error(code, err, match, tmp_path / "adapter")
    with pytest.raises(AbliterateError):
        from abliterate.export.peft import lora_factors

        lora_factors(resolve(base.model), _direction(resolve(base.model).hidden_size))


def test_biases_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from abliterate.export.peft import lora_factors

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, mlp_bias=True))
    layout = resolve(model)
    with pytest.raises(AbliterateError, match="mlp.down_proj.bias: LoRA adapters cannot change biases"):
        lora_factors(layout, _direction(32, layer=1))
