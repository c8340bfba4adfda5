"""Activation addition: identities of the hook and of the baked bias."""

import pytest
import torch
from conftest import make_model

from abliterate import AbliterateError, Direction, resolve
from abliterate.edit.steer import Steering, bake_steering, parse_layers, steered


def direction(hidden=64, scale=3.0, seed=2):
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return Direction(vector=v / v.norm(), layer=2, scale=scale)


def enc(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(["How do I bake bread?", "Name three rivers in Europe, please."], return_tensors="pt",
                     padding=True)


@torch.no_grad()
def test_strength_zero_is_identity_and_sign_matters(tokenizer):
    model = make_model("llama", tokenizer)
    e = enc(tokenizer)
    base = model(**e).logits
    with steered(model, Steering(direction(), 0.0, (1, 3))):
        assert torch.equal(model(**e).logits, base)
    with steered(model, Steering(direction(), 1.5, (2,))):
        plus = model(**e).logits
    with steered(model, Steering(direction(), -1.5, (2,))):
        minus = model(**e).logits
    assert not torch.allclose(plus, base, atol=1e-3) and not torch.allclose(plus, minus, atol=1e-3)
    assert torch.equal(model(**e).logits, base), "hooks removed on exit"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@torch.no_grad()
def test_baked_bias_equals_hook_and_survives_saving(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(arch, tokenizer)
    e = enc(tokenizer)
    s = Steering(direction(), 2.0, (2, 4))
    with steered(model, s):
        hooked = model(**e).logits
    baked = bake_steering(model, s)
    torch.testing.assert_close(baked(**e).logits, hooked, atol=1e-4, rtol=1e-4)
    baked.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(reloaded(**e).logits, hooked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,why", [("gemma2", "post-MLP norm"), ("phi3", "no MLP-bias switch"),
                                      ("qwen3", "normalises queries"), ("qwen3_moe", "fused experts")])
def test_architectures_that_cannot_store_a_bias_say_why(arch, why, tokenizer):
    model = make_model(arch, tokenizer)
    with pytest.raises(AbliterateError, match=why):
        bake_steering(model, Steering(direction(), 1.0, (2,)))


def test_bad_steering_inputs(tokenizer):
    model = make_model("llama", tokenizer)
    layout = resolve(model)
    with pytest.raises(AbliterateError, match="not a finite number"):
        Steering(direction(), float("nan"), (1,)).check(layout)
    with pytest.raises(AbliterateError, match="layer 9 is out of range"):
        Steering(direction(), 1.0, (9,)).check(layout)
    with pytest.raises(AbliterateError, match="hidden size is 64"):
        Steering(direction(hidden=32), 1.0, (1,)).check(layout)
    with pytest.raises(AbliterateError, match="no block before it"):
        bake_steering(model, Steering(direction(), 1.0, (0,)))
    assert parse_layers("8-10,3") == (8, 9, 10, 3)
    with pytest.raises(AbliterateError, match="not a layer list"):
        parse_layers("eight")


def test_answer_logprob_prefers_the_models_own_answer(tokenizer):
    """Coherence measure: the model's greedy answer scores at least as well as shuffled tokens."""
    from abliterate.measure.decode import generate
    from abliterate.measure.evaluation import answer_logprob

    model = make_model("llama", tokenizer)
    texts = ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"]
    gen = generate(model, tokenizer, texts, max_new_tokens=6, batch_size=1, desc=None)
    own = answer_logprob(model, tokenizer, texts, gen.ids, batch_size=1)
    shuffled = answer_logprob(model, tokenizer, texts, [list(reversed(gen.ids[0]))], batch_size=1)
    assert own.item() <= 0 and own.item() >= shuffled.item()


def test_cli_steer_sweep_induce(tokenizer, model_dirs, tmp_path, capsys):
    import json

    from abliterate.cli import main

    src = model_dirs["qwen2"]
    dfile = tmp_path / "d.safetensors"
    assert main(["-q", "directions", str(src), "-o", str(dfile), "--n-train", "8", "--n-select", "4"]) == 0
    capsys.readouterr()
    code = main(["-q", "steer", str(src), "--direction", str(dfile), "--strength", "2", "--layers", "2",
                 "-n", "3", "--max-new-tokens", "4", "-o", str(tmp_path / "baked")])
    out = capsys.readouterr().out
    assert code == 0 and "refusal rate" in out and "baked into" in out
    manifest = json.loads((tmp_path / "baked" / "manifest.json").read_text())
    assert manifest["steering"] == {"layers": [2], "strength": 2.0,
                                    "units": "multiples of the direction's mean difference"}
    code = main(["-q", "sweep", str(src), "--direction", str(dfile), "--layers", "2", "--strengths=-1,0,2",
                 "-n", "3", "--max-new-tokens", "4", "--plot", str(tmp_path / "s.png"), "--json",
                 str(tmp_path / "s.json"), "--marker", "the"])
    assert code == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["strength"] for r in rows] == [-1.0, 0.0, 2.0]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["-q", "induce", str(src), "-o", str(tmp_path / "ind"), "--n-train", "8", "--n-select", "4",
                 "--n-eval-harmless", "3", "--max-new-tokens", "4", "--layers", "2;1-3", "--strengths", "1,2"])
    assert code == 0
    manifest = json.loads((tmp_path / "ind" / "manifest.json").read_text())
    assert manifest["steering"]["layers"] in ([2], [1, 2, 3]) and 1 <= len(manifest["search"]) <= 4
    assert (tmp_path / "ind" / "config.json").is_file()
    capsys.readouterr()
    code = main(["-q", "steer", str(src), "--direction", str(dfile), "--strength", "inf", "-n", "2"])
    assert code == 2 and "not a finite number" in capsys.readouterr().err


def test_cli_concept_direction_from_two_prompt_sets(model_dirs, tmp_path, capsys):
    from abliterate.cli import main

    out = tmp_path / "fr.safetensors"
    code = main(["-q", "concept", str(model_dirs["llama"]), "--positive", "builtin:french:train", "--negative",
                 "builtin:english:train", "--layer", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    d = Direction.load(out)
    assert d.layer == 2 and d.meta["positive"] == "builtin:french:train" and d.scale > 0
