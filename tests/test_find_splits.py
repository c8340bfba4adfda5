"""Which prompts fit, selected and reported an edit: recorded in the manifest, and a report set that is not held
out refused before any model loads, by `run` and by `eval` of its output (find/splits.py)."""

import hashlib
import json
import random

from conftest import FAST, assert_clean_error, run_cli

from abliterate import RunConfig, load_prompts, run
from abliterate.find.splits import fingerprint, overlap

TINY = dict(n_train=8, n_select=4, n_eval_harmful=4, n_eval_harmless=4, max_new_tokens=4, kl_tokens=3)
EVAL_FAST = ["--n-eval-harmful", "4", "--n-eval-harmless", "4", "--max-new-tokens", "4", "--kl-tokens", "3"]


def sha256(prompts) -> str:  # as the manifest documents it, recomputed here rather than imported
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def short(prompt: str) -> str:
    return hashlib.sha256(" ".join(prompt.split()).casefold().encode()).hexdigest()[:16]


def test_fingerprints_fold_case_and_whitespace_and_overlap_counts_each_report_prompt_once():
    assert fingerprint("How do I  bake\tbread?") == fingerprint(" how do i bake bread? ")
    assert fingerprint("How do I bake bread?") == short("how do i bake bread?")
    assert fingerprint("How do I bake bread?") != fingerprint("How do I bake a cake?")
    ov = overlap(["a", "B", "c", "d"], {fingerprint("a"), fingerprint("b")}, {fingerprint("b"), fingerprint("c")})
    assert (ov.n_report, ov.fit, ov.select, ov.prompts) == (4, 2, 2, 3)
    assert ov.note() == "(overlaps fit/select set: 3 prompts)"
    assert overlap(["x"], {fingerprint("a")}, set()).note() is None


def test_the_manifest_records_the_three_sets(model_dirs):
    result = run(str(model_dirs["qwen2"]), None, RunConfig(**TINY))
    splits = json.loads(json.dumps(result.manifest))["splits"]  # as saved
    for side in ("harmful", "harmless"):
        items = list(load_prompts(f"builtin:{side}:train").prompts)
        random.Random(0).shuffle(items)  # steps.split: one shuffle with --seed, --n-select first, then --n-train
        expected = {"fit": (f"builtin:{side}:train", items[4:12]), "select": (f"builtin:{side}:train", items[:4]),
                    "report": (f"builtin:{side}:test", load_prompts(f"builtin:{side}:test").prompts[:4])}
        for role, (source, prompts) in expected.items():
            entry = splits[role][side]
            assert (entry["source"], entry["n"], entry["sha256"]) == (source, len(prompts), sha256(prompts)), role
            assert entry["fingerprints"] == [short(p) for p in prompts], role
    assert splits["fit"]["harmful"]["sha256"] == result.direction.meta["harmful_sha256"]  # the direction's own record
    assert (splits["overlap"], splits["overlap_note"], splits["overlap_allowed_by"]) == (0, None, None)


def twelve(tmp_path):
    """A harmful file whose 12 prompts are all fit (--n-train 8) or select (--n-select 4) prompts."""
    path = tmp_path / "harmful12.txt"
    path.write_text("\n".join(load_prompts("builtin:harmful:train").prompts[:12]) + "\n")
    return path


def test_an_overlapping_report_set_is_refused_before_the_model_loads(capsys, tmp_path):
    p = twelve(tmp_path)
    code, _, err = run_cli(capsys, "run", tmp_path / "not-even-loaded", "-o", tmp_path / "out", *FAST,
                           "--harmful", p, "--eval-harmful", p)
    assert_clean_error(code, err, "4 of the 8 report prompts", tmp_path / "out")  # not "does not exist": no load
    assert "--allow-overlap" in err and str(p) in err


def test_allow_overlap_goes_on_flagged_and_eval_of_the_output_refuses_the_same_report_set(capsys, caplog, tmp_path,
                                                                                         model_dirs):
    p, out = twelve(tmp_path), tmp_path / "out"
    code, stdout, err = run_cli(capsys, "run", model_dirs["qwen2"], "-o", out, *FAST, "--harmful", p,
                                "--eval-harmful", p, "--allow-overlap")
    assert code == 0, err
    assert "(overlaps fit/select set: 4 prompts)" in stdout
    assert "in-sample" in err + caplog.text  # one warning line (pytest may hold the log handler)
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert (splits["overlap"], splits["overlap_allowed_by"]) == (4, "--allow-overlap")
    assert splits["overlap_with"]["fit"] + splits["overlap_with"]["select"] == 4
    assert splits["overlap_note"] == "(overlaps fit/select set: 4 prompts)"
    assert "(overlaps fit/select set: 4 prompts)" in (out / "report.html").read_text()
    # eval reads the output's manifest: the same report prompts are refused, before the original is loaded
    code, _, err = run_cli(capsys, "eval", out, "--original", tmp_path / "not-even-loaded", "--eval-harmful", p,
                           *EVAL_FAST, "--json", tmp_path / "e.json")
    assert_clean_error(code, err, "4 of the 8 report prompts", tmp_path / "e.json")
    assert "--allow-overlap" in err and str(p) in err and str(out / "manifest.json") in err
    code, stdout, err = run_cli(capsys, "eval", out, "--original", model_dirs["qwen2"], "--eval-harmful", p,
                                *EVAL_FAST, "--json", tmp_path / "e.json", "--allow-overlap")
    assert code == 0, err
    assert "(overlaps fit/select set: 4 prompts)" in stdout
    report = json.loads((tmp_path / "e.json").read_text())["splits"]
    assert (report["overlap"], report["overlap_allowed_by"]) == (4, "--allow-overlap")
    assert report["manifests"] == [str(out / "manifest.json")]


def test_eval_refuses_a_malformed_splits_section_before_loading(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "abliterate.run", "splits": {"fit": {"harmful": 3}}}))
    code, _, err = run_cli(capsys, "eval", out, "--json", tmp_path / "e.json")
    assert_clean_error(code, err, "`splits` section", tmp_path / "e.json")
    assert "--allow-overlap" in err
