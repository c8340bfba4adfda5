"""Multiple-choice capability: the loader's errors, stratified sampling, MMLU groups, cached == uncached
scoring on tiny random models, and the paired comparison's bookkeeping."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FAST, assert_clean_error, make_model, run_cli

from abliterate.edit.project import ablated
from abliterate.errors import AbliterateError
from abliterate.find.directions import Direction
from abliterate.measure import capability
from abliterate.measure.capability import (
    MMLU_GROUPS,
    SUBJECT_GROUP,
    Item,
    Scores,
    compare,
    load_items,
    prefix_text,
    question_text,
    read_items,
    score,
    stratified,
)

MMLU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "capability"
GOOD = {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1}


def write(tmp_path, name, text: str | bytes) -> Path:
    p = tmp_path / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


def jsonl(*rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_reads_jsonl_and_json_list(tmp_path):
    p = write(tmp_path, "a.jsonl", jsonl(GOOD, {**GOOD, "answer": "C", "subject": "math"}))
    items = read_items(p)
    assert items == [Item("2 + 2 = ?", ("3", "4", "5", "22"), 1), Item("2 + 2 = ?", ("3", "4", "5", "22"), 2, "math")]
    # raw U+2028 and U+0085 inside a string are valid JSON, and not line breaks of a JSONL file
    odd = write(tmp_path, "odd.jsonl", jsonl(GOOD, {**GOOD, "question": "x\u2028y\x85z"}, GOOD).replace("\\u2028", "\u2028")
                .replace("\\u0085", "\x85"))
    assert [it.question for it in read_items(odd)] == ["2 + 2 = ?", "x\u2028y\x85z", "2 + 2 = ?"]
    q = write(tmp_path, "a.json", json.dumps([GOOD, GOOD]))
    assert read_items(q) == [items[0], items[0]]


@pytest.mark.parametrize("row, message", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, "line 3: no 'answer'"),
    ({**GOOD, "answer": 4}, "line 3: answer 4 is not a choice; use an index 0-3 or a letter A-D"),
    ({**GOOD, "answer": -1}, "line 3: answer -1 is not a choice"),
    ({**GOOD, "answer": "E"}, "line 3: answer 'E' is not a choice"),
    ({**GOOD, "answer": True}, "line 3: answer True is not a choice"),
    ({**GOOD, "answer": "1"}, "line 3: answer '1' is not a choice"),
    ({**GOOD, "choices": ["only"]}, "line 3: 'choices' must be a list of at least two strings"),
    ({**GOOD, "choices": ["a", 2, "c"]}, "line 3: every choice must be a string"),
    ({**GOOD, "question": ""}, "line 3: 'question' must be a non-empty string"),
    ({**GOOD, "subject": 7}, "line 3: 'subject' must be a string"),
    (["not", "an", "object"], "line 3: expected an object"),
])
def test_bad_rows_name_file_line_and_fix(tmp_path, row, message):
    # a blank line before the bad row: numbers count real lines of the file
    p = write(tmp_path, "bad.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(AbliterateError) as e:
        read_items(p)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)


def test_bad_files(tmp_path):
    cases = [
        (write(tmp_path, "latin1.jsonl", json.dumps(GOOD).replace("?", "\xe9").encode("latin-1")), "not UTF-8"),
        (write(tmp_path, "broken.jsonl", json.dumps(GOOD) + "\n{\"question\": \n"), "line 2: not valid JSON"),
        (write(tmp_path, "broken.json", "[\n" + json.dumps(GOOD) + ",\n{oops}\n]"), "line 3: not valid JSON"),
        (write(tmp_path, "empty.jsonl", "\n  \n"), "empty"),
        (write(tmp_path, "none.json", "[]"), "holds no items"),
        (tmp_path / "missing.jsonl", "no such file"),
    ]
    for path, message in cases:
        with pytest.raises(AbliterateError, match=message) as e:
            read_items(path)
        assert str(path) in str(e.value)
    p = write(tmp_path, "list.json", json.dumps([GOOD, {**GOOD, "answer": 9}]))
    with pytest.raises(AbliterateError, match="item 2: answer 9"):
        read_items(p)


def test_sample_size_spec(tmp_path):
    p = write(tmp_path, "s.jsonl", jsonl(*[{**GOOD, "subject": f"s{i % 3}"} for i in range(9)]))
    assert len(load_items(str(p))) == 9 and len(load_items(f"{p}:4")) == 4
    for tail in ("0", "-2", "x", ""):
        with pytest.raises(AbliterateError, match="N in FILE:N must be a positive integer"):
            load_items(f"{p}:{tail}")
    with pytest.raises(AbliterateError, match="asks for 10 items but .* has 9; lower N"):
        load_items(f"{p}:10")


def _subjects(sizes: dict[str, int]) -> list[Item]:
    return [Item(f"{s} q{i}", ("a", "b"), 0, s) for s, k in sizes.items() for i in range(k)]


def test_stratified_is_deterministic_proportional_and_covers_subjects():
    sizes = {"big": 600, "mid": 250, "small": 100, "tiny": 30, "one": 1, "two": 2}
    items = _subjects(sizes)
    s = stratified(items, 100, seed=0)
    assert s == stratified(items, 100, seed=0) and s != stratified(items, 100, seed=1)
    assert len(s) == 100 and len(set(s)) == 100
    got = Counter(it.subject for it in s)
    assert set(got) == set(sizes)  # every subject, even the one-item one
    for subject, k in sizes.items():  # proportional to what is left after one each, within one item
        assert abs(got[subject] - (1 + (100 - 6) * (k - 1) / (983 - 6))) < 1, subject
    assert [items.index(it) for it in s] == sorted(items.index(it) for it in s)  # file order
    assert Counter(it.subject for it in stratified(items, 3, 0)) == {"big": 2, "mid": 1}  # fewer than subjects: by size
    assert stratified(items, 5000, 0) == items
    with pytest.raises(AbliterateError, match="positive integer; got 0"):
        stratified(items, 0, 0)


def test_every_mmlu_subject_is_mapped():
    all_subjects = [s for g in MMLU_GROUPS.values() for s in g]
    assert len(all_subjects) == len(set(all_subjects)) == 57
    assert Counter(SUBJECT_GROUP.values()) == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    path = MMLU / "mmlu_test.jsonl"
    if not path.is_file():
        pytest.skip(f"MMLU data not found at {path}")
    subjects = {json.loads(line)["subject"] for line in path.open()}
    assert subjects == set(SUBJECT_GROUP)


def test_prompt_format_is_lm_eval_mmlu():
    ex = Item("What is 1+1?", ("1", "2", "3", "4"), 1, "high_school_mathematics")
    q = Item(" Which is prime?", ("4", "6", "7", "9"), 2, "high_school_mathematics")
    assert prefix_text("high_school_mathematics", [ex]) == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n")
    assert question_text(q) == "Which is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"


def _items():
    qs = ["Which is a fruit?", "Which is a colour?", "What do people drink?", "Which one can fly?",
          "Where do fish live?"]
    choices = [("apple", "stone", "car", "shoe"), ("red", "dog", "cup", "tree"), ("water", "sand", "glass", "wood"),
               ("bird", "rock", "fish", "table"), ("sea", "desert", "sky", "road")]
    test = [Item(q, c, i % 4, "s1" if i < 3 else "s2") for i, (q, c) in enumerate(zip(qs, choices))]
    dev = [Item(f"Example {k} for {s}?", ("yes", "no", "maybe", "never"), k % 4, s) for s in ("s1", "s2")
           for k in range(2)]
    return test, dev


def _uncached(model, tokenizer, items, dev, shots):
    """Reference: every (item, choice) as one full forward pass, no cache, no padding."""

    def enc(t):
        return tokenizer(t, add_special_tokens=False).input_ids

    out = []
    for it in items:
        prefix = enc(prefix_text(it.subject, [d for d in dev if d.subject == it.subject][:shots]))
        q = enc(question_text(it))
        row = []
        for j in range(len(it.choices)):
            c = enc(f" {capability.LETTERS[j]}")
            ids = torch.tensor([prefix + q + c])
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            start = len(prefix) + len(q)
            row.append(float(sum(logp[start - 1 + t, c[t]] for t in range(len(c)))))
        out.append(row)
    return out


# rotary and absolute positions; Gemma 3's sliding window (32 tokens here) is shorter than its 2-shot prompts, where
# a shared prefix's cache with padding after it would count the padding inside the window (`sliding_window`)
@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gemma3_text"])
# The tiny tokenizer splits " A" into two tokens; common words are one token: both scoring paths run.
@pytest.mark.parametrize("letters, single", [("ABCDEFGHIJ", False), (("the", "and", "to", "of"), True)])
def test_cached_scores_equal_uncached(arch, letters, single, tokenizer, monkeypatch):
    monkeypatch.setattr(capability, "LETTERS", letters)
    conts = [tokenizer(f" {x}", add_special_tokens=False).input_ids for x in letters[:4]]
    assert all(len(c) == 1 for c in conts) == single
    model = make_model(arch, tokenizer)
    items, dev = _items()
    got = score(model, tokenizer, items, shots=2, dev_items=dev, batch_size=2)
    ref = _uncached(model, tokenizer, items, dev, 2)
    assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(ref), atol=1e-4)
    assert got.predicted == [max(range(4), key=r.__getitem__) for r in ref]
    assert got.tokens > 0 and got.shots == 2


def test_score_under_hooks_changes_with_the_edit_and_not_after(tokenizer):
    model = make_model("qwen2", tokenizer)
    items, dev = _items()
    plain = score(model, tokenizer, items, shots=1, dev_items=dev)
    v = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    with ablated(model, Direction(v, layer=2)):
        edited = score(model, tokenizer, items, shots=1, dev_items=dev)
    assert not torch.allclose(torch.tensor(plain.logprobs), torch.tensor(edited.logprobs), atol=1e-3)
    again = score(model, tokenizer, items, shots=1, dev_items=dev)
    assert torch.allclose(torch.tensor(again.logprobs), torch.tensor(plain.logprobs), atol=1e-5)


def test_score_needs_exemplars(tokenizer):
    model = make_model("qwen2", tokenizer)
    items, dev = _items()
    with pytest.raises(AbliterateError, match="pass dev_items"):
        score(model, tokenizer, items, shots=1)
    with pytest.raises(AbliterateError, match="subject 's1' has 2 exemplars in dev_items, 3 needed"):
        score(model, tokenizer, items, shots=3, dev_items=dev)
    zero = score(model, tokenizer, items, shots=0)
    assert len(zero.predicted) == len(items)


def _scores(items, predicted):
    return Scores(items, predicted, [[0.0] * len(it.choices) for it in items], shots=0)


def test_compare_with_itself():
    items = [Item(f"q{i}", ("a", "b", "c", "d"), i % 4, s) for i, s in
             enumerate(["abstract_algebra", "philosophy", "sociology", "anatomy"] * 5)]
    s = _scores(items, [0, 1, 0, 0] * 5)  # half right
    r = compare(s, s)
    assert r.retention == 1 and r.lost == [] and r.gained == [] and r.change.p_value == 1
    lo, hi = r.retention_interval
    assert lo < 1 < hi
    assert r.before == r.after and r.before.count == 10
    assert set(r.groups) == {"STEM", "humanities", "social sciences", "other"}
    assert r.groups["STEM"].retention == r.groups["humanities"].retention == 1
    d = r.to_dict()
    assert d["groups"]["other"]["retention"] is None  # 0 right before: undefined, and JSON has no NaN
    json.dumps(d, allow_nan=False)


def test_compare_counts_a_constructed_case():
    items = [Item(f"q{i}", ("a", "b"), 0, "abstract_algebra" if i < 6 else "philosophy") for i in range(10)]
    before = _scores(items, [0, 0, 0, 0, 1, 1, 0, 0, 0, 1])  # right: 0-3, 6-8
    after = _scores(items, [0, 1, 0, 0, 0, 1, 1, 1, 0, 0])  # right: 0, 2, 3, 4, 8, 9
    r = compare(before, after)
    assert r.lost == [1, 6, 7] and r.gained == [4, 9]
    assert (r.before.count, r.after.count, r.change.n) == (7, 6, 10)
    assert r.retention == pytest.approx(6 / 7) and r.change.difference == pytest.approx(-0.1)
    stem, hum = r.groups["STEM"], r.groups["humanities"]
    assert stem.lost == [1] and stem.gained == [4] and stem.retention == 1
    assert hum.lost == [6, 7] and hum.gained == [9] and hum.retention == pytest.approx(2 / 3)
    d = r.to_dict()
    assert d["lost_items"] == [1, 6, 7] and d["groups"]["humanities"]["lost"] == 2
    with pytest.raises(AbliterateError, match="same items"):
        compare(before, _scores(items[:5], [0] * 5))


def test_a_check_at_chance_says_it_cannot_show_a_loss():
    """28/100 right on four choices (Wilson 95% CI 20-37%) includes chance (25%): the comparison says so, in its
    JSON and its table; 60/100 (50-69%) resolves."""
    from abliterate.show.tables import capability_table

    items = [Item(f"q{i}", ("a", "b", "c", "d"), 0, "anatomy") for i in range(100)]
    guessing = compare(*[_scores(items, [0] * 28 + [1] * 72)] * 2)
    assert guessing.chance == pytest.approx(0.25) and not guessing.resolves
    assert guessing.to_dict()["resolves"] is False and guessing.groups["other"].chance == pytest.approx(0.25)
    assert "not above chance (25%)" in capability_table(guessing)
    knowing = compare(*[_scores(items, [0] * 60 + [1] * 40)] * 2)
    assert knowing.resolves and "chance" not in capability_table(knowing)
    two = compare(*[_scores([Item("q", ("a", "b"), 0)] * 100, [0] * 58 + [1] * 42)] * 2)
    assert two.chance == pytest.approx(0.5) and not two.resolves  # 58/100 on two choices: 48-67% includes 50%


def test_run_and_eval_report_capability_with_intervals(capsys, tmp_path, model_dirs):
    """--capability on the command line: run saves it in the manifest, eval prints and saves it; both compare
    the original and the edited model on the same items; a bad file fails before any model loads."""
    spec, dev = f"{MMLU / 'mmlu_test.jsonl'}:6", MMLU / "mmlu_dev.jsonl"
    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST, "--capability", spec,
                              "--capability-dev", dev, "--capability-shots", "1")
    assert code == 0, err
    assert "capability (6 items): original" in text and "retention" in text
    cap = json.loads((out / "manifest.json").read_text())["capability"]
    assert cap["n"] == 6 and cap["accuracy_before"]["n"] == 6 and len(cap["accuracy_before"]["ci95"]) == 2
    assert sum(g["n"] for g in cap["groups"].values()) == 6
    code, text, err = run_cli(capsys, "eval", model_dirs["llama"], "--direction", out / "direction.safetensors",
                              *FAST[4:], "--capability", spec, "--json", tmp_path / "e.json")
    assert code == 0, err
    again = json.loads((tmp_path / "e.json").read_text())["capability"]
    assert again["n"] == 6 and "capability (6 items)" in text  # zero-shot here: its own figures
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    code, _, err = run_cli(capsys, "run", tmp_path / "no-model", "--capability", bad)
    assert_clean_error(code, err, str(bad))


def test_quick_sample_is_the_stratified_sample_of_the_full_file(full_quick_sample):
    items, dev = capability.quick_items()
    assert len(items) == capability.QUICK_N and {it.subject for it in items} == set(SUBJECT_GROUP)
    assert all(sum(d.subject == s for d in dev) == 5 for s in SUBJECT_GROUP)  # 5-shot for every subject
    path = MMLU / "mmlu_test.jsonl"
    if not path.is_file():
        pytest.skip(f"MMLU data not found at {path}")
    assert items == stratified(read_items(path), capability.QUICK_N, 0)  # benchmarks/make_mmlu_quick.py, seed 0


def test_cloze_cached_scores_equal_uncached(tokenizer):
    """The continuation protocol: each choice's own text scored after 'Answer:', per character (lm-eval's acc_norm;
    tests/test_measure_harness.py checks it against lm-eval itself)."""
    model = make_model("qwen2", tokenizer)
    items, dev = _items()
    got = score(model, tokenizer, items, shots=1, dev_items=dev, batch_size=3, protocol="cloze")
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids
    for it, row, pred in zip(items, got.logprobs, got.predicted):
        base = enc(prefix_text(it.subject, [d for d in dev if d.subject == it.subject][:1], "cloze")
                   + question_text(it, "cloze"))
        assert question_text(it, "cloze") == f"Question: {it.question}\nAnswer:"
        ref = []
        for c in capability.continuations(it, "cloze"):
            ids = enc(c)
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=torch.tensor([base + ids])).logits[0].double(), -1)
            ref.append(float(sum(logp[len(base) - 1 + t, ids[t]] for t in range(len(ids)))))
        assert row == pytest.approx(ref, abs=1e-4)
        norm = [lp / len(c) for lp, c in zip(ref, it.choices)]  # per character, the space before it not counted
        assert pred == max(range(4), key=norm.__getitem__)
    with pytest.raises(AbliterateError, match="protocol 'mc' is not one of: letter, cloze"):
        score(model, tokenizer, items, shots=0, protocol="mc")


def test_run_checks_capability_by_default_with_groups_and_the_report_section(capsys, tmp_path, model_dirs):
    """No --capability: the packaged quick sample, zero-shot cloze (here its items of one subject: conftest's
    small_quick_check), in the table, the manifest and report.html; the letter protocol 5-shot with the packaged
    exemplars; --capability none turns it off."""
    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST)
    assert code == 0, err
    n = len(capability.quick_items()[0])
    assert f"capability ({n} items): original" in text and "social sciences" in text
    cap = json.loads((out / "manifest.json").read_text())["capability"]
    assert (cap["n"], cap["items"], cap["shots"], cap["protocol"]) == (n, "quick (packaged MMLU sample)", 0, "cloze")
    assert list(cap["groups"]) == ["social sciences"] and cap["groups"]["social sciences"]["n"] == n
    assert len(cap["accuracy_before"]["ci95"]) == len(cap["accuracy_after"]["ci95"]) == 2
    html = (out / "report.html").read_text()
    assert f"What it cost: multiple-choice accuracy (0-shot, {n} items)" in html and "retention (95% CI)" in html
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "letter", *FAST,
                              "--capability-protocol", "letter")
    assert code == 0, err
    cap = json.loads((tmp_path / "letter" / "manifest.json").read_text())["capability"]
    assert (cap["n"], cap["shots"], cap["protocol"]) == (n, 5, "letter")
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "off", *FAST, "--capability", "none")
    assert code == 0, err
    assert "capability (" not in text and "capability" not in json.loads((tmp_path / "off" / "manifest.json").read_text())


@pytest.mark.parametrize("row, message", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, "no 'answer'"),
    ({**GOOD, "answer": 7}, "answer 7 is not a choice; use an index 0-3"),
    ({**GOOD, "choices": ["only"]}, "'choices' must be a list of at least two strings"),
])
def test_bad_capability_file_on_the_command_line(capsys, tmp_path, model_dirs, row, message):
    """One line naming the file, exit 2, before the model loads and with nothing written."""
    bad = write(tmp_path, "bad.jsonl", jsonl(GOOD, row))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST, "--capability", bad)
    assert_clean_error(code, err, f"{bad}: line 2: {message}", out)
    code, _, err = run_cli(capsys, "eval", model_dirs["llama"], "--original", model_dirs["llama"], *FAST[4:],
                           "--capability", bad, "--json", tmp_path / "e.json")
    assert_clean_error(code, err, message, tmp_path / "e.json")
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, "--capability-protocol", "mc")
    assert_clean_error(code, err, "--capability-protocol 'mc' is not one of: letter, cloze", out)
