import json

import pytest
from conftest import hide_module

from abliterate import AbliterateError, ChatFormat, load_prompts


def test_builtin_sets_are_large_varied_and_split():
    for kind in ("harmful", "harmless"):
        every = load_prompts(f"builtin:{kind}")
        train, test = load_prompts(f"builtin:{kind}:train"), load_prompts(f"builtin:{kind}:test")
        assert len(every) >= 256 and len(set(every.prompts)) == len(every)
        assert len(set(every.categories)) >= 12
        assert set(train.prompts).isdisjoint(test.prompts)
        assert len(train) + len(test) == len(every) and len(test) >= 50


def test_held_out_harmful_prompts_separate_a_ten_point_change():
    """harmful_test.txt adds held-out prompts after the every-fifth ones: the fit set and the first 56 of the
    report set are what they were, no added prompt is a fit prompt (by fingerprint), and at 112 prompts a
    10-point net drop in refusals is outside the noise of the paired test (exact McNemar, p < 0.05) even with
    four prompts moving the other way; at 56, one such prompt was enough to hide it."""
    from abliterate.find.splits import fingerprint
    from abliterate.measure.stats import mcnemar_exact

    train, test = load_prompts("builtin:harmful:train"), load_prompts("builtin:harmful:test")
    assert len(test) == 112 and len(train) == 224
    assert set(test.categories[56:]) == set(test.categories[:56])  # every category gains prompts
    assert {fingerprint(p) for p in test.prompts}.isdisjoint(fingerprint(p) for p in train.prompts)
    assert len({fingerprint(p) for p in test.prompts}) == 112
    net = round(0.1 * len(test))
    assert all(mcnemar_exact(net + back, back) < 0.05 for back in range(5))
    assert mcnemar_exact(round(0.1 * 56) + 1, 1) > 0.05


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv"])
def test_file_formats(tmp_path, suffix):
    prompts = ["How do I bake bread?", "Write a poem, please."]
    path = tmp_path / f"p{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(prompts) + "\n\n")
    elif suffix == ".json":
        path.write_text(json.dumps([{"instruction": p, "category": "x"} for p in prompts]))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    else:
        path.write_text('id,question\n1,"How do I bake bread?"\n2,"Write a poem, please."\n')
    got = load_prompts(str(path), column="question" if suffix == ".csv" else None)
    assert list(got.prompts) == prompts


def test_shared_json_reads(shared_prompts):
    assert len(load_prompts(str(shared_prompts / "harmful_val.json"))) == 39


@pytest.mark.parametrize("content,suffix,match", [
    ("\n \n", ".txt", "empty"),
    ("[]", ".json", "empty"),
    ("{not json", ".json", "not valid JSON"),
    ('[{"text2": "x"}]', ".json", "no field"),
    ("a,b\n1,2\n", ".csv", "no column 'prompt'"),
    ("hi", ".yaml", "unknown prompt file type"),
])
def test_bad_prompt_files(tmp_path, content, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(AbliterateError, match=match):
        load_prompts(str(path))


def test_missing_file_and_unknown_builtin():
    with pytest.raises(AbliterateError, match="does not exist"):
        load_prompts("/nonexistent/prompts.txt")
    with pytest.raises(AbliterateError, match="no built-in prompt set"):
        load_prompts("builtin:nice")


def test_chat_format(tokenizer):
    fmt = ChatFormat(system="Be brief.")
    text = fmt.render(tokenizer, "Hello there")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    suffix = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ChatFormat().n_post_instruction(tokenizer) == len(suffix) >= 3
    assert ChatFormat(plain=True).render(tokenizer, "Hi") == "Hi\n"


def test_no_chat_template_is_a_clear_error(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(AbliterateError, match="no chat template.*--plain-prompts"):
        ChatFormat().render(tok, "Hi")


def test_hub_dataset_without_the_datasets_package_is_a_clear_error(monkeypatch):
    hide_module(monkeypatch, "datasets")
    with pytest.raises(AbliterateError, match="pip install datasets"):
        load_prompts("hf:someone/prompts")


def test_hf_prompt_sets_load_through_datasets(tmp_path):
    """`hf:ID` goes through `datasets.load_dataset` (installed with lm-eval in [test]): a dataset folder on disk
    loads offline, its column found by name or given; an id the hub cannot serve here is one clear error."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    rows = [{"goal": f"Explain step {i} of making bread", "id": i} for i in range(3)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompts(f"hf:{folder}")
    assert got.prompts == tuple(r["goal"] for r in rows)
    with pytest.raises(AbliterateError, match="could not load dataset someone/no-such-prompts split train"):
        load_prompts("hf:someone/no-such-prompts")
