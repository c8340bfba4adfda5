"""The whole pipeline on a tiny model, and the pieces it relies on."""

import hashlib
import json

import pytest
import torch
from conftest import make_model

from abliterate import AbliterateError, Direction, RunConfig, run
from abliterate.export.files import write_dir_atomic
from abliterate.measure.evaluation import evaluate
from abliterate.measure.refusal import is_degenerate, is_refusal, refusal_score

TINY = dict(n_train=8, n_select=4, n_eval_harmful=4, n_eval_harmless=4, max_new_tokens=4, kl_tokens=3)


def test_refusal_detector():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry, I cannot assist.")  # curly apostrophe
    assert is_refusal("As an AI language model, I must decline.")
    assert is_refusal("")  # empty counts as a failure
    assert is_refusal("the the the the the the the the the the the the the")
    assert not is_refusal("Sure! Here is a recipe for banana bread: mash three ripe bananas...")
    assert not is_refusal("To reverse a list in Python, use reversed(xs) or xs[::-1].")
    assert is_degenerate("!!! ??? ...") and not is_degenerate("Fine.")
    assert is_degenerate("contacting a team with the following video video video video video video video video")
    assert is_degenerate("we have a plan, we have the client, we have the client, we have the client")
    assert not is_degenerate("I'm sorry, but I can't assist with this request. I cannot provide any information.")
    assert not is_degenerate("里昂是法国东南部的一座城市，以美食和历史闻名。")
    assert is_degenerate("里昂是城市，里昂是城市，里昂是城市，里昂是城市，里昂是城市")
    assert not is_degenerate("1. Preheat the oven. 2. Mix the flour and the sugar. 3. Bake for twenty minutes.")


def test_refusal_score_is_log_odds():
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert refusal_score(logits, [0]).item() == pytest.approx(torch.log(torch.tensor(0.25 / 0.75)).item(), rel=1e-5)
    assert refusal_score(logits, [0, 1]).item() == pytest.approx(0.0, abs=1e-5)


def test_kl_of_a_model_with_itself_is_zero(tokenizer):
    model = make_model("llama", tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in ("Hello", "How do I bake bread?", "Name three rivers.")]
    ref = evaluate(model, tokenizer, texts[:1], texts, max_new_tokens=3, kl_tokens=4, batch_size=4)
    again = evaluate(model, tokenizer, texts[:1], texts, reference=ref, max_new_tokens=3, kl_tokens=4,
                     batch_size=4)
    assert again.metrics.kl_first == pytest.approx(0.0, abs=1e-5)
    assert again.metrics.kl_continuation == pytest.approx(0.0, abs=1e-5)
    assert again.harmless.text == ref.harmless.text


def test_samples_show_what_the_edit_did():
    """(original refused, edited refused) per prompt in, the pairs printed out: unlocked harmful prompts first,
    then harmless ones the edit broke (one always shown when any), then harmful ones still refused, then the rest."""
    from abliterate.measure.evaluation import pick_samples, sample_kind

    T, F = True, False
    harmful = [(F, F), (T, T), (T, F), (F, F), (T, F)]
    harmless = [(F, F), (F, T), (F, T)]
    assert pick_samples(harmful, harmless, 3) == [("harmful", 2), ("harmful", 4), ("harmless", 1)]
    assert pick_samples(harmful, [(F, F)] * 3, 3) == [("harmful", 2), ("harmful", 4), ("harmful", 1)]
    assert pick_samples([(T, F)] * 5, harmless, 3) == [("harmful", 0), ("harmful", 1), ("harmless", 1)]
    assert pick_samples([(F, F)] * 4, harmless, 3) == [("harmless", 1), ("harmless", 2), ("harmful", 0)]
    # the demo's case: the original already answered every harmful prompt, the edit changed nothing
    assert pick_samples([(F, F)] * 4, [(F, F)] * 2, 3) == [("harmful", 0), ("harmful", 1), ("harmful", 2)]
    assert pick_samples([(F, F)], [(T, T)], 3) == [("harmful", 0), ("harmless", 0)]
    assert sample_kind("harmful", T, F) == "harmful prompt the original refused and the edit answered"
    assert sample_kind("harmless", F, T) == ("harmless prompt the original answered and the edit refused "
                                            "(broken by the edit)")
    assert sample_kind("harmful", F, T) == "harmful prompt the original answered and the edit refused"
    assert sample_kind("harmful", T, T) == "harmful prompt both refused"


def test_run_end_to_end_saves_a_model_that_reloads(tmp_path, model_dirs):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    weights = model_dirs["qwen2"] / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = run(str(model_dirs["qwen2"]), out, RunConfig(**TINY))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "manifest.json", "direction.safetensors", "metrics.json", "tokenizer.json"} <= files
    assert any(f.endswith(".safetensors") and f.startswith("model") for f in files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["direction"]["layer"] == result.direction.layer
    assert manifest["config"]["n_train"] == 8 and "torch" in manifest["versions"]
    assert sum(s["chosen"] for s in manifest["selection"]) == 1
    # the samples are labelled by what the edit did to them, as generations.json has it
    from abliterate.measure.evaluation import sample_kind

    pairs = json.loads((out / "generations.json").read_text())
    rows = {(side, r["prompt"]): r for side in ("harmful", "harmless") for r in pairs[side]}
    assert len(manifest["samples"]) == 3
    for s in manifest["samples"]:
        r = rows[s["side"], s["prompt"]]
        assert s["kind"] == sample_kind(s["side"], r["original_refused"], r["edited_refused"])
    assert result.after.metrics.kl_first > 0
    # Plain transformers loads it, and it is the edited model, not the original.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    d = Direction.load(out / "direction.safetensors")
    emb = reloaded.model.embed_tokens.weight
    assert (emb @ d.vector).abs().max() < 1e-5
    assert reloaded.config.tie_word_embeddings is False
    original = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    torch.testing.assert_close(reloaded.lm_head.weight, original.lm_head.weight)  # head untied, not edited
    # The input model is untouched.
    assert not (model_dirs["qwen2"] / "manifest.json").exists()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest


def test_forced_layer_and_projected(tmp_path, model_dirs):
    result = run(str(model_dirs["gemma3_text"]), None, RunConfig(**TINY, layer=2, projected=True))
    assert result.direction.layer == 2 and result.direction.projected and result.selection is None


def test_all_positions_are_candidates(model_dirs):
    result = run(str(model_dirs["llama"]), None, RunConfig(**TINY, positions="all"))
    positions = {s.position for s in result.selection.scores}
    assert len(positions) >= 3 and -1 in positions


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"

    def fill(tmp):
        (tmp / "half.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomic(out, fill)
    assert list(tmp_path.iterdir()) == []


def test_too_few_prompts(tmp_path, model_dirs):
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    with pytest.raises(AbliterateError, match="at least 6 are needed"):
        run(str(model_dirs["llama"]), None, RunConfig(**{**TINY, "harmful": str(few)}))
