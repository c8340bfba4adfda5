"""The search's pieces: weighted ablation hooks == baked weights, the prefix cache, profiles, bases, the study."""

import copy
import json
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ARCHS, GEMMA, assert_clean_error, inputs, make_model, random_ablation, run_cli

from abliterate import AbliterateError, resolve
from abliterate.edit.weighted import Ablation, ablating, apply_ablation_
from abliterate.measure.decode import eos_ids, generate, greedy
from abliterate.model.forward import cached_logits
from abliterate.search.probe import make_probe
from abliterate.search.space import (
    DEFAULT_OPTIONS,
    OPTIONS,
    DirectionSource,
    Params,
    Profile,
    parse_options,
)
from abliterate.search.study import TrialResult, choose, pareto, run_search

PLAIN = [a for a in ARCHS if a not in GEMMA and a != "qwen3_moe"]


@pytest.mark.parametrize("norm", ["none", "row", "column"])
@pytest.mark.parametrize("arch", PLAIN)
@torch.no_grad()
def test_weighted_hooks_equal_baked_weights(arch, norm, tokenizer):
    model = make_model(arch, tokenizer)
    layout = resolve(model)
    enc = inputs(tokenizer)
    ab = random_ablation(layout, norm=norm)
    original = model(**enc).logits
    with ablating(model, ab, layout):
        hooked = model(**enc).logits
    assert torch.equal(model(**enc).logits, original), "hooks must be removed on exit"
    assert not torch.allclose(hooked, original, atol=1e-3)
    baked = copy.deepcopy(model)
    apply_ablation_(baked, ab, resolve(baked))
    torch.testing.assert_close(baked(**enc).logits, hooked, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("norm", ["row", "column"])
@torch.no_grad()
def test_norm_preservation_keeps_the_stated_norms(norm, tokenizer):
    model = make_model("llama", tokenizer)
    layout = resolve(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ab = random_ablation(layout, norm=norm)
    edited = apply_ablation_(model, ab, layout)
    w = dict(model.named_parameters())["model.layers.0.self_attn.o_proj.weight"]  # (H out, in)
    axis = 1 if norm == "row" else 0
    torch.testing.assert_close(w.norm(dim=axis), before["model.layers.0.self_attn.o_proj.weight"].norm(dim=axis))
    assert "model.layers.1.self_attn.o_proj.weight" not in edited  # weight 0: untouched
    assert torch.equal(dict(model.named_parameters())["model.layers.1.self_attn.o_proj.weight"],
                       before["model.layers.1.self_attn.o_proj.weight"])


@torch.no_grad()
def test_weight_one_without_norms_is_orthogonalization(tokenizer):
    """Weight 1, one direction: the writers' outputs have no component along it (the classic edit)."""
    model = make_model("qwen2", tokenizer)
    layout = resolve(model)
    r = torch.nn.functional.normalize(torch.randn(layout.hidden_size), dim=0)
    L = layout.n_layers
    ab = Ablation(r.expand(L, 1, -1).contiguous(), torch.ones(L), torch.ones(L), r.unsqueeze(0), 1.0)
    apply_ablation_(model, ab, layout)
    for b in layout.blocks:
        for w in b.attn + b.mlp:
            assert (w.param.movedim(w.out_dim, -1) @ r).abs().max() < 1e-5


@pytest.mark.parametrize("arch", sorted(GEMMA) + ["qwen3_moe"])
def test_norm_preservation_needs_plain_writers(arch, tokenizer):
    model = make_model(arch, tokenizer)
    layout = resolve(model)
    with pytest.raises(AbliterateError, match="norm 'none'"):
        apply_ablation_(model, random_ablation(layout, norm="row"), layout)
    apply_ablation_(model, random_ablation(layout, norm="none"), layout)  # without: fine


def test_ablation_file_round_trip_and_wrong_model(tmp_path, tokenizer):
    layout = resolve(make_model("llama", tokenizer))
    ab = random_ablation(layout, norm="column")
    ab.params = {"direction": 1.5}
    back = Ablation.load(ab.save(tmp_path / "a.safetensors"))
    assert torch.equal(back.bases, ab.bases) and back.norm == "column" and back.params == {"direction": 1.5}
    small = Ablation(ab.bases[:, :, :32].contiguous(), ab.attn, ab.mlp, ab.embed_basis[:, :32].contiguous())
    with pytest.raises(AbliterateError, match="another model"):
        small.check(layout)
    with pytest.raises(AbliterateError, match="not an abliterate ablation"):
        Ablation.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_gives_the_same_logits(arch, tokenizer):
    """Running the shared template opening once and reusing its cache changes nothing."""
    model = make_model(arch, tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True)
             for t in ("How do I bake bread?", "Rome?", "Tell me about the history of Rome and its emperors.")]
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    plain = cached_logits(model, [], ids, 3, tokenizer.pad_token_id, 2)
    p = 3
    assert all(x[:p] == ids[0][:p] for x in ids)
    cached = cached_logits(model, ids[0][:p], [x[p:] for x in ids], 3, tokenizer.pad_token_id, 2)
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)
    # greedy answers through the cache, with or without a shared prefix, are transformers' own greedy answers
    eos = eos_ids(model, tokenizer)
    ref = []
    for x in ids:  # one prompt at a time: no padding
        seq = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                             max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=sorted(eos))[0, len(x):].tolist()
        ref.append(seq[:next((t + 1 for t, tok in enumerate(seq) if tok in eos), len(seq))])
    for prefix in (ids[0][:p], []):
        got = greedy(model, prefix, [x[len(prefix):] for x in ids], max_new_tokens=5, pad_id=tokenizer.pad_token_id,
                     eos=eos, batch_size=2, keep_logprobs=2)
        assert got.ids == ref
        torch.testing.assert_close(got.first, plain[:, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.logprobs[:, 0], torch.log_softmax(plain[:, -1], -1), atol=1e-4, rtol=1e-4)
    assert generate(model, tokenizer, texts, max_new_tokens=5, batch_size=2, desc=None).ids == ref


def test_profile_weights():
    w = Profile(peak=1.2, center=3.0, floor=0.5, width=2.0).weights(8)
    torch.testing.assert_close(w, torch.tensor([0, 0.6, 0.9, 1.2, 0.9, 0.6, 0, 0]))
    assert torch.equal(Params.classic(8).attn.weights(8), torch.ones(8))


def test_bases_are_orthonormal_and_interpolate():
    g = torch.Generator().manual_seed(0)
    harmful = torch.randn(20, 4, 16, generator=g) + 3 * torch.eye(16)[0]
    harmful = harmful.unsqueeze(2)  # one token position
    src = DirectionSource(harmful, harmful.double().mean(0), torch.randn(4, 1, 16, generator=g).double())
    b = src.basis(1.5, projected=True, k=3)
    torch.testing.assert_close(b @ b.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(b[0].double(), src.direction(1.5, True), atol=1e-6, rtol=0)
    torch.testing.assert_close(src.direction(2.0, False), src.diff(2, False))
    mid = src.direction(1.5, False)
    assert mid @ src.diff(1, False) > 0 and mid @ src.diff(2, False) > 0
    mu = src.harmless_mean[1, -1] / src.harmless_mean[1, -1].norm()
    assert abs(src.diff(1, True) @ mu) < 1e-9  # projected: no harmless-mean component


def test_directions_at_other_token_positions():
    g = torch.Generator().manual_seed(1)
    harmful = torch.randn(20, 4, 3, 16, generator=g)  # (N, L, P, H)
    harmful[:, :, 0] += 3 * torch.eye(16)[5]  # position -3 separates along axis 5, the others along nothing
    src = DirectionSource(harmful, harmful.double().mean(0), torch.zeros(4, 3, 16, dtype=torch.float64))
    assert src.n_positions == 3
    assert src.direction(2.0, False, position=-3)[5] > 0.9 > abs(src.direction(2.0, False, position=-1)[5])
    p = Params.classic(4)
    p.position, p.k = -3, 2
    ab = src.ablation(p)
    torch.testing.assert_close(ab.bases[0, 0], src.direction(p.direction, False, -3).float())
    assert Params.from_flat(p.flat()).position == -3
    legacy = {k: v for k, v in p.flat().items() if k != "position"}  # manifests written before positions
    assert Params.from_flat(legacy).position == -1
    with pytest.raises(AbliterateError, match="position -4"):
        src.direction(2.0, False, position=-4)


def test_options_parse():
    assert parse_options("default") == DEFAULT_OPTIONS and parse_options("all") == tuple(OPTIONS)
    assert parse_options("+row,+embed") == tuple(o for o in OPTIONS if o in {*DEFAULT_OPTIONS, "row", "embed"})
    assert "embed" not in parse_options("+embed,-embed") and "row" in parse_options("+embed,-embed,+row")
    assert parse_options("none") == () and parse_options("embed,row") == ("embed", "row")  # a list, in OPTIONS order
    assert parse_options("row,embed") == ("embed", "row")
    with pytest.raises(AbliterateError, match="unknown"):
        parse_options("+bogus")


def _t(n, r, kl, counted=None):
    return TrialResult(n, {}, r, kl, kl, counted)


def test_pareto_and_choice_rule():
    trials = [_t(0, 5.0, 0.01), _t(1, 2.0, 0.05), _t(2, 2.0, 0.09), _t(3, 0.5, 0.2), _t(4, 6.0, 0.02)]
    assert [t.number for t in pareto(trials)] == [3, 1, 0]
    fin = [_t(3, 0.5, 0.2, 1), _t(1, 2.0, 0.05, 2), _t(0, 5.0, 0.01, 6)]
    assert choose(fin, slack=1, max_kl=None)[0].number == 1
    assert choose(fin, slack=0, max_kl=None)[0].number == 3
    assert choose(fin, slack=0, max_kl=0.1)[0].number == 1  # the guard excludes trial 3
    pick, rule = choose(fin, slack=0, max_kl=0.001)
    assert pick.number == 0 and "no finalist" in rule


def _setup(tokenizer, arch="qwen2"):
    model = make_model(arch, tokenizer)
    layout = resolve(model)
    chat = lambda t: tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,  # noqa: E731
                                                  add_generation_prompt=True)
    harmful = [chat(f"How do I make weapon number {i}?") for i in range(6)]
    harmless = [chat(f"Write a poem about the number {i}.") for i in range(6)]
    g = torch.Generator().manual_seed(0)
    L, H = layout.n_layers, layout.hidden_size
    per = torch.randn(12, L, 1, H, generator=g)
    src = DirectionSource(per, per.double().mean(0), torch.randn(L, 1, H, generator=g).double())
    probe = make_probe(model, tokenizer, harmful, harmless, max_new_tokens=4, steps=3, batch_size=4)
    return model, layout, src, probe


def test_probe_uses_the_shared_prefix(tokenizer):
    model, layout, src, probe = _setup(tokenizer)
    assert len(probe.prefix) >= 3 and probe.refusal_ids
    assert all(len(s) >= 1 for s in probe.harmful)


def test_search_resumes_after_a_kill_and_finishes(tmp_path, tokenizer):
    model, layout, src, probe = _setup(tokenizer)
    study = tmp_path / "study.journal"
    kw = dict(trials=6, study_path=study, fingerprint="tiny", max_new_tokens=4, finalists=2, time_budget=None,
              options=DEFAULT_OPTIONS, slack=1, max_kl=None, seed=0)
    first = run_search(model, layout, src, probe, stop_after=3, **kw)
    assert len(first.trials) == 3
    # plain abliteration first, then the seeds at half weight
    assert [t.params for t in first.trials] == [p.flat() for p in Params.seeds(layout.n_layers)[:3]]
    assert first.trials[0].params == Params.classic(layout.n_layers).flat()
    again = run_search(model, layout, src, probe, **kw)
    assert len(again.trials) == 6 and [t.number for t in again.trials[:3]] == [0, 1, 2]
    assert again.chosen in again.finalists and all(t.refusals is not None for t in again.finalists)
    # the chosen point resolves to the ablation returned
    assert torch.equal(again.ablation.attn, src.ablation(Params.from_flat(again.chosen.params)).attn)
    with pytest.raises(AbliterateError, match="another model"):
        run_search(model, layout, src, probe, **(kw | {"fingerprint": "other"}))
    assert json.loads(study.read_text().splitlines()[0])  # a journal of JSON lines


SEARCH = ["--n-train", "8", "--n-search", "4", "--n-eval-harmful", "4", "--n-eval-harmless", "4",
          "--max-new-tokens", "4", "--kl-tokens", "3", "--search", "--trials", "4", "--finalists", "2"]


def _weights(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name.startswith("model"):
            out.update(load_file(f))
    return out


def test_run_search_then_apply_manifest_is_bit_exact(capsys, tmp_path, model_dirs):

    out = tmp_path / "searched"
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *SEARCH)
    assert code == 0, err
    assert "<- chosen" in text and "rule:" in text
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = manifest["search"]["chosen"]
    assert chosen["chosen"] and set(chosen["params"]) >= {"direction", "norm", "k", "attn_peak", "embed"}
    assert (tmp_path / "searched.study").exists()  # the study lives next to the output
    # every finalist answered the capability items under its hooks, by run's code: the chosen one scores what
    # the baked model scores, against the original's one measurement
    assert "capability (95% CI)" in text
    cap = manifest["capability"]
    for f in manifest["search"]["finalists"]:
        assert f["capability"]["accuracy_before"] == cap["accuracy_before"] and f["capability"]["n"] == cap["n"]
        assert set(f["capability"]) >= {"retention", "retention_ci95", "difference_ci95", "mcnemar_p"}
    assert chosen["capability"]["accuracy_after"] == cap["accuracy_after"]
    again = tmp_path / "again"
    code, text, err = run_cli(capsys, "apply", model_dirs["llama"], "--manifest", out / "manifest.json", "-o", again)
    assert code == 0, err
    a, b, orig = _weights(out), _weights(again), _weights(model_dirs["llama"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "apply --manifest must reproduce the weights bit for bit"
    assert any(not torch.equal(a[k], orig[k]) for k in orig)  # and the edit did something
    # an apply's manifest carries the same edit on
    code, _, err = run_cli(capsys, "apply", model_dirs["llama"], "--manifest", again / "manifest.json", "-o",
                           tmp_path / "third")
    assert code == 0, err
    c = _weights(tmp_path / "third")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # every finalist's edit is saved, and --pick keeps another trial of the finished study (no new trials)
    for f in manifest["search"]["finalists"]:
        assert (out / f["ablation_file"]).is_file()
    other = next(n for n in range(4) if n != chosen["number"])
    picked = tmp_path / "picked"
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", picked, *SEARCH, "--study",
                              tmp_path / "searched.study", "--pick", str(other))
    assert code == 0, err
    search = json.loads((picked / "manifest.json").read_text())["search"]
    assert search["chosen"]["number"] == other and "picked by the user" in search["rule"] and search["trials"] == 4
    assert chosen["number"] in [f["number"] for f in search["finalists"]]
    # apply --trial: the rule's choice, from the picked run's finalists, is the first run's model bit for bit
    code, _, err = run_cli(capsys, "apply", model_dirs["llama"], "--manifest", picked / "manifest.json",
                           "--trial", str(chosen["number"]), "-o", tmp_path / "fourth")
    assert code == 0, err
    d = _weights(tmp_path / "fourth")
    assert all(torch.equal(a[k], d[k]) for k in a)
    code, _, err = run_cli(capsys, "apply", model_dirs["llama"], "--manifest", out / "manifest.json", "--trial",
                           "77", "-o", tmp_path / "fifth")
    assert_clean_error(code, err, "--trial 77", tmp_path / "fifth")
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "sixth", *SEARCH, "--study",
                           tmp_path / "searched.study", "--pick", "77")
    assert_clean_error(code, err, "--pick 77", tmp_path / "sixth")
    # on a terminal the user is asked (Enter keeps the rule's choice)
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "abliterate.cli", "-q", "run", str(model_dirs["llama"]), "-o",
                                           str(tmp_path / "asked"), *map(str, SEARCH), "--study",
                                           str(tmp_path / "searched.study")],
                          timeout=300, encoding="utf-8", dimensions=(40, 200))
    child.expect("keep which trial")
    child.sendline("999")
    child.expect("not a trial of the front")
    front = [t["number"] for t in manifest["search"]["front"]]
    target = next((n for n in front if n != chosen["number"]), None)  # another front point, if there is one
    child.sendline("" if target is None else str(target))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    asked = json.loads((tmp_path / "asked" / "manifest.json").read_text())["search"]
    assert asked["chosen"]["number"] == (chosen["number"] if target is None else target)
    # a rerun resumes the finished study: no new trials, the same choice
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "rerun", *SEARCH)
    assert code == 0, err
    rerun = json.loads((tmp_path / "rerun" / "manifest.json").read_text())["search"]
    assert rerun["study"] == str(tmp_path / "rerun.study") and rerun["trials"] == 4


def test_search_bad_input(capsys, tmp_path, model_dirs):

    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *SEARCH, "--search-options=-bogus")
    assert_clean_error(code, err, "bogus", out)
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *SEARCH, "--trials", "0")
    assert_clean_error(code, err, "--trials", out)
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *SEARCH, "--search-on", "train")
    assert_clean_error(code, err, "--search-on 'train'", out)
    code, _, err = run_cli(capsys, "apply", model_dirs["llama"], "-o", out)
    assert_clean_error(code, err, "--manifest", out)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run_cli(capsys, "apply", model_dirs["llama"], "--manifest", bad, "-o", out)
    assert_clean_error(code, err, "not an abliterate manifest", out)


def test_search_on_the_evaluation_prompts(model_dirs):
    """--search-on eval (Heretic's way): trials are scored on the evaluation prompts themselves."""
    from abliterate import RunConfig
    from abliterate.commands.run import run

    cfg = RunConfig(n_train=8, n_eval_harmful=5, n_eval_harmless=6, max_new_tokens=4, kl_tokens=3, search=True,
                    trials=2, finalists=1, search_on="eval", pick="rule")
    r = run(model_dirs["llama"], None, cfg)
    assert (r.search.n_harmful, r.search.n_harmless) == (5, 6)
    assert (r.after.metrics.n_harmful, r.after.metrics.n_harmless) == (5, 6)
    splits = r.manifest["splits"]  # asked for, so not refused; but said: every report prompt scored the trials
    assert splits["select"]["by"] == "--search-on eval" and splits["select"]["harmful"]["source"] == cfg.eval_harmful
    assert (splits["overlap"], splits["overlap_with"]["fit"]) == (11, 0)
    assert splits["overlap_allowed_by"] == "--search-on eval"
    assert r.search.capability_before is not None and r.search.chosen.capability is not None
    assert r.search.chosen.capability["accuracy_before"]["count"] == r.capability.before.count
    held = run(model_dirs["llama"], None, replace(cfg, search_on="held-out", n_search=3, capability="none"))
    assert all(t.capability is None for t in held.search.finalists) and held.search.capability_before is None
    assert (held.search.n_harmful, held.search.n_harmless) == (3, 3)
    splits = held.manifest["splits"]
    assert (splits["select"]["by"], splits["select"]["harmful"]["n"]) == ("--n-search", 3)
    assert splits["fit"]["harmful"]["n"] == 8 and splits["overlap"] == 0


def test_run_search_to_gguf_saves_every_finalist_and_apply_bakes_one(capsys, tmp_path, model_dirs):

    out = tmp_path / "tiny.gguf"
    code, _, err = run_cli(capsys, "run", model_dirs["qwen2"], "-o", out, "--gguf-type", "F32", *SEARCH)
    assert code == 0, err
    search = json.loads((tmp_path / "tiny.manifest.json").read_text())["search"]
    assert search["ablation_file"] == "tiny.ablation.safetensors" and (tmp_path / search["ablation_file"]).is_file()
    files = {f["number"]: tmp_path / f["ablation_file"] for f in search["finalists"]}
    assert files[search["chosen"]["number"]].name == "tiny.ablation.safetensors"  # saved once, not twice
    assert all(f.is_file() and f.parent.name == "tiny.finalists" for n, f in files.items()
               if n != search["chosen"]["number"])
    # any finalist, baked from the GGUF run's manifest
    number = max((n for n in files if n != search["chosen"]["number"]), default=search["chosen"]["number"])
    code, _, err = run_cli(capsys, "apply", model_dirs["qwen2"], "--manifest", tmp_path / "tiny.manifest.json",
                           "--trial", str(number), "-o", tmp_path / "again")
    assert code == 0, err
    applied = json.loads((tmp_path / "again" / "manifest.json").read_text())["search"]
    assert applied["chosen"]["number"] == number
    assert torch.equal(Ablation.load(tmp_path / "again" / "ablation.safetensors").bases,
                       Ablation.load(files[number]).bases)
