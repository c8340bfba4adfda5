"""Identities of the two ways to remove a direction, on a tiny model of every architecture."""

import copy

import pytest
import torch
from conftest import ARCHS, GEMMA, inputs, make_model

from abliterate import (
    AbliterateError,
    Direction,
    ablated,
    added,
    orthogonalize_,
    resolve,
)
from abliterate.edit.project import residual_component
from abliterate.edit.weighted import project


def random_direction(hidden: int, seed: int = 1) -> Direction:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=g)
    return Direction(vector=v / v.norm(), layer=1)


def hidden_component(model, enc, r) -> float:
    """Largest |h.r|/|h| over the residual stream entering every block."""
    out = model(**enc, output_hidden_states=True)
    n = model.config.get_text_config().num_hidden_layers
    real = enc["attention_mask"].bool()  # padding embeds to zero in some models: skip it
    return max(((h[real] @ r).abs() / h[real].norm(dim=-1)).max().item() for h in out.hidden_states[:n])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_writer_is_orthogonal_after_baking(arch, tokenizer):
    model = make_model(arch, tokenizer)
    layout = resolve(model)
    d = random_direction(layout.hidden_size)
    names = orthogonalize_(model, d, layout)
    r = d.vector
    assert len(names) == len(layout.embeddings) + sum(len(b.attn) + len(b.mlp) for b in layout.blocks)
    for w in layout.embeddings:
        assert (w.param.movedim(w.out_dim, -1) @ r).abs().max() < 1e-5, w.name
    for block in layout.blocks:
        for writers, scale in ((block.attn, block.attn_scale), (block.mlp, block.mlp_scale)):
            u = r if scale is None else torch.nn.functional.normalize(r * scale, dim=0)
            for w in writers:
                assert (w.param.movedim(w.out_dim, -1) @ u).abs().max() < 1e-5, w.name


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_residual_stream_has_no_component(arch, tokenizer):
    """Both interventions leave nothing along r anywhere in the stream (Gemma included)."""
    model = make_model(arch, tokenizer)
    enc = inputs(tokenizer)
    d = random_direction(resolve(model).hidden_size)
    assert hidden_component(model, enc, d.vector) > 1e-2  # the check can fail
    with ablated(model, d):
        assert hidden_component(model, enc, d.vector) < 1e-5
    orthogonalize_(model, d)
    assert hidden_component(model, enc, d.vector) < 1e-5
    assert residual_component(model, tokenizer, d) < 1e-5


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in GEMMA])
@torch.no_grad()
def test_hooks_equal_baked_weights(arch, tokenizer):
    model = make_model(arch, tokenizer)
    enc = inputs(tokenizer)
    d = random_direction(resolve(model).hidden_size)
    original = model(**enc).logits
    with ablated(model, d):
        hooked = model(**enc).logits
    assert torch.equal(model(**enc).logits, original), "hooks must be removed on exit"
    baked = copy.deepcopy(model)
    orthogonalize_(baked, d)
    assert not torch.allclose(hooked, original, atol=1e-3)  # the edit does something
    torch.testing.assert_close(baked(**enc).logits, hooked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(GEMMA))
@torch.no_grad()
def test_gemma_post_norm_writers_are_zero_where_they_enter(arch, tokenizer):
    """Gemma: what each block adds to the stream, after its post-norm, has no component along r."""
    model = make_model(arch, tokenizer)
    layout = resolve(model)
    d = random_direction(layout.hidden_size)
    orthogonalize_(model, d, layout)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append((out @ d.vector).abs().max() / out.abs().max()))
             for b in layout.blocks for m in (b.attn_hook, b.mlp_hook)]
    model(**inputs(tokenizer))
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * layout.n_layers and max(seen) < 1e-5


def test_tied_head_is_untied_and_unchanged(tokenizer):
    model = make_model("llama_tied", tokenizer)
    layout = resolve(model)
    head = model.lm_head.weight.detach().clone()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    orthogonalize_(model, random_direction(layout.hidden_size), layout)
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.model.embed_tokens.weight, head)
    assert model.config.tie_word_embeddings is False


@torch.no_grad()
def test_adding_zero_is_identity_and_hook_is_removed(tokenizer):
    model = make_model("qwen2", tokenizer)
    enc = inputs(tokenizer)
    original = model(**enc).logits
    with added(model, torch.zeros(64), layer=2):
        assert torch.equal(model(**enc).logits, original)
    with added(model, torch.ones(64), layer=2):
        assert not torch.allclose(model(**enc).logits, original)
    assert torch.equal(model(**enc).logits, original)
    with pytest.raises(AbliterateError, match="out of range"):
        with added(model, torch.ones(64), layer=99):
            pass


def test_direction_for_another_model_is_refused(tokenizer):
    model = make_model("llama", tokenizer)
    with pytest.raises(AbliterateError, match="hidden size is 64"):
        orthogonalize_(model, random_direction(32))
    with pytest.raises(AbliterateError, match="hidden size"):
        with ablated(model, random_direction(32)):
            pass


def test_projection_is_idempotent_and_orthogonal():
    r = torch.nn.functional.normalize(torch.randn(16), dim=0)
    x = torch.randn(3, 5, 16)
    y = project(x, r[None], 1.0)
    assert (y @ r).abs().max() < 1e-5
    torch.testing.assert_close(project(y, r[None], 1.0), y)
    torch.testing.assert_close(project(x, r[None], 0.0), x)  # weight 0 is the identity
