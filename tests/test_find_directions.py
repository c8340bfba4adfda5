import pytest
import torch
from conftest import make_model

from abliterate import AbliterateError, Candidates, Direction
from abliterate.find.activations import collect
from abliterate.find.directions import load_candidates


def synthetic(L=3, P=2, H=8) -> Candidates:
    g = torch.Generator().manual_seed(0)
    harmless = torch.randn(L, P, H, generator=g, dtype=torch.float64) + 3
    harmful = harmless + torch.randn(L, P, H, generator=g, dtype=torch.float64)
    return Candidates(harmful, harmless, tuple(range(-P, 0)), {"model": "synthetic"})


def test_difference_of_means_is_unit_and_points_from_harmless_to_harmful():
    c = synthetic()
    d = c.direction(1, -1)
    diff = (c.harmful[1, 1] - c.harmless[1, 1]).float()
    assert d.vector.norm().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(d.vector, diff / diff.norm())
    assert d.scale == pytest.approx(diff.norm().item(), rel=1e-6)


def test_projected_direction_is_orthogonal_to_harmless_mean():
    c = synthetic()
    d = c.direction(2, -2, projected=True)
    assert abs(float(d.vector.double() @ c.harmless[2, 0])) < 1e-5
    assert d.projected


def test_save_load_round_trip(tmp_path):
    c = synthetic()
    d = c.direction(1, -1)
    path = d.save(tmp_path / "dir.safetensors", c)
    back = Direction.load(path)
    assert torch.equal(back.vector, d.vector)
    assert (back.layer, back.position, back.projected, back.scale) == (1, -1, False, d.scale)
    assert back.meta["model"] == "synthetic"
    again = load_candidates(path)
    assert torch.equal(again.harmful, c.harmful) and again.positions == c.positions


def test_bad_layer_position_and_file(tmp_path):
    c = synthetic()
    with pytest.raises(AbliterateError, match="layer 7 is out of range"):
        c.direction(7)
    with pytest.raises(AbliterateError, match="position -5 was not collected"):
        c.direction(0, -5)
    (tmp_path / "x.safetensors").write_text("garbage")
    with pytest.raises(AbliterateError, match="not an abliterate direction file"):
        Direction.load(tmp_path / "x.safetensors")


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])  # rotary and absolute positions
def test_batched_left_padded_means_equal_one_by_one(tokenizer, arch):
    """Left padding and length sorting must not change any prompt's activations."""
    model = make_model(arch, tokenizer)
    texts = ["Hi", "How are you doing today, my friend?", "Tell me a very long story about a cat and a dog."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
    batched = collect(model, tokenizer, texts, n_positions=3, batch_size=3, keep=True, desc=None)
    singles = [collect(model, tokenizer, [t], n_positions=3, batch_size=1, desc=None).mean for t in texts]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched.per_prompt[i].double(), single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched.mean, torch.stack(singles).mean(0), atol=1e-4, rtol=1e-4)
    assert batched.mean.dtype == torch.float64 and batched.mean.shape == (5, 3, 64)
