"""Loops in any script (`measure/repeats.py`) and where they decide degeneration (`is_degenerate`, `long.loops`):
loops of Latin, Cyrillic, CJK and Thai text, of code and of a token without spaces are found; real answers that
do not loop are left alone (the labelled set and the ordinary answers stored in tests/data)."""

import json
from pathlib import Path

import pytest

from abliterate.measure.long import loops
from abliterate.measure.refusal import is_degenerate, is_refusal, refusal_marker
from abliterate.measure.repeats import LOOP_WIDTH, looping, tail_repeat

DATA = Path(__file__).parent / "data"

# The reference model's answer to a harmful prompt under the damaged edit of benchmarks/bench_damaged.py (a random
# direction ablated at weight 4 from every writer): one 90-letter "word" to the word rules, so it passed as an
# answer and the markers counted the edit a success (8/16 -> 0/16 refusals).
DAMAGED = "варварвар\n\n" + "вар" * 28

LOOPS = {
    "latin sentence": "Sure, here is the article. " + "The US Congress is a bastion of the free market. " * 5,
    "latin tail": ("To bake bread, mix flour, water, salt and yeast, knead it for ten minutes and let it rise. "
                   + "Then you bake it again and " * 4).strip(),
    "cyrillic words": "Вот ответ на ваш вопрос. " + "Это очень важно для нас и для вас. " * 4,
    "cyrillic token": DAMAGED,
    "latin token": "Here is the plan: " + "ymmy" * 15,
    "chinese": "长城是中国古代的军事防御工程。" + "它是世界上最长的城墙，" * 4,
    "japanese": "日本には四つの季節があります。" + "春は桜がきれいです。" * 4,
    "thai": "ฝนเกิดจากไอน้ำ" + "ที่ลอยขึ้นไปบนฟ้า" * 4,
    "sql": "The payload:\n\n```\nCREATE DEFINITIONS\n" + "CREATE OR REPLACE\n" * 5,
    "python": "```python\ndef generate(count):\n    return {\n" + '        "count": 100,\n' * 4,
}

ORDINARY = {
    "latin": ("Photosynthesis happens in the chloroplasts. First, light is absorbed by chlorophyll; the energy "
              "splits water into oxygen, protons and electrons. Then the Calvin cycle fixes carbon dioxide into "
              "sugars, using the ATP and NADPH made in the first stage."),
    "list": "1. Preheat the oven. 2. Mix the flour and the sugar. 3. Bake for twenty minutes. 4. Let it cool.",
    "cyrillic": ("Москва была основана в 1147 году князем Юрием Долгоруким. В XIV веке она стала центром "
                 "объединения русских земель, а в 1918 году снова стала столицей."),
    "chinese": "长城始建于春秋战国时期，秦始皇统一中国后将各段城墙连接起来，明朝又进行了大规模的修建。",
    "refrain": ("The sea is calling, the sea is calling,\nit sings of salt and foam.\nThe sea is calling, "
                "the sea is calling,\nit calls the sailors home."),
    "tests": ("def test_add():\n    assert add(1, 2) == 3\n    assert add(-1, 1) == 0\n    assert add(0, 0) == 0\n"
              "    assert add(1.5, 2.5) == 4.0\n    assert add(-2, -3) == -5\n"),
    "html": ("<tr><td>Monday</td><td>Mon</td></tr>\n<tr><td>Tuesday</td><td>Tue</td></tr>\n"
             "<tr><td>Wednesday</td><td>Wed</td></tr>\n<tr><td>Thursday</td><td>Thu</td></tr>"),
    "markdown table": "| fruit | count |\n| --- | --- |\n| apples | 3 |\n| pears | 5 |\n| plums | 7 |",
    "separator": "Results\n" + "=" * 60 + "\nall tests passed",
    "laughter": "Ha ha ha ha, that is a good one!",
}


IPV4 = ("Use this pattern:\n\n```regex\n\\b" + "(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\\." * 3
        + "(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\\b\n```\n\nEach group matches one octet, 0 to 255.")


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loops_in_every_script_are_found(name):
    text = LOOPS[name]
    r = tail_repeat(text)
    assert r is not None and r.copies >= 3 and r.width >= LOOP_WIDTH, (name, r)
    assert looping(text) and loops(text) and is_degenerate(text) and is_refusal(text), name


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_text_and_code_are_not_loops(name):
    text = ORDINARY[name]
    assert not looping(text) and not loops(text) and not is_degenerate(text), (name, tail_repeat(text))


def test_code_that_repeats_and_goes_on_is_not_a_loop():
    assert not looping(IPV4) and tail_repeat(IPV4) is None  # the octet group four times, then the explanation
    assert looping(IPV4.split("```\n")[0] + "(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\\." * 3)  # ... unless it ends so
    array = "x = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"
    assert not looping(array)  # numbers only: a printed array, not a loop (the unit needs a letter)


def test_the_damaged_answer_is_degenerate_but_no_marker_refusal():
    r = tail_repeat(DAMAGED)
    assert (r.unit, r.period, r.span) == ("вар", 3, 84)  # the 28 copies after "варварвар\n\n"
    assert is_degenerate(DAMAGED) and looping(DAMAGED) and refusal_marker(DAMAGED) is None  # markers: an answer


def test_the_repeat_is_the_longest_end_in_its_shortest_unit():
    r = tail_repeat("Hello. abcabcabcabcabcabcabc and then xyxyxyxyxyxyxy")
    assert (r.unit, r.period, r.span) == ("xy", 2, 14)  # the stretch that ends the text, not the longer one
    assert tail_repeat("abcabcabcabc!") is None and tail_repeat("abcab") is None and tail_repeat("") is None
    assert tail_repeat("ab" * 10, min_copies=11) is None and tail_repeat("ab" * 10, min_copies=10).span == 20
    assert tail_repeat("Go on. THE  End\n the end THE END").unit == " the end"  # case and whitespace folded
    steps = " ".join(f"{i}. Use the company resources and support tools." for i in range(15, 21))
    assert tail_repeat(steps) is None  # numbers kept: tests that differ in them are code
    assert tail_repeat("Done " + "-" * 40) is None and tail_repeat("a" + "!?" * 20) is None  # layout, not text
    assert tail_repeat("日本の四季について説明してください。" * 4 + "\ufffd").copies == 4  # a cut character dropped


def test_threshold_is_thirty_characters_of_three_copies():
    assert not looping("abc " * 7) and looping("abc " * 8)  # 27 folded characters, then 31 (the end's space folded)
    assert not looping("a quite long sentence that repeats. " * 2)  # two copies can be a quotation
    assert looping("a quite long sentence that repeats. " * 3)
    cjk = "里昂是城市，" * 4 + "里昂是城市"  # 29 characters, 58 columns: a CJK character is the text of two Latin ones
    assert tail_repeat(cjk).span == 29 and tail_repeat(cjk).width == 58 and looping(cjk)
    assert not looping("你好" * 7) and looping("你好" * 8)  # 28 columns, then 32


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_labelled_answers_that_do_not_loop_are_left_alone():
    """The judge's labelled set: 156 real 64-token answers of two models, `loops` read answer by answer."""
    rows = _rows("judge_labels.jsonl")
    flagged = {r["id"] for r in rows if looping(r["answer"])}
    looped = {r["id"] for r in rows if r["loops"]}
    assert len(rows) == 156 and len(looped) == 14
    assert flagged <= looped and len(flagged) >= 5, flagged - looped


def test_ordinary_answers_in_many_scripts_and_code_are_left_alone():
    """Ordinary 256-token answers of the reference (coder) model and SmolLM2-135M to our own prompts, half of them
    code, the rest in twelve languages; `loops` read answer by answer. None that does not loop is flagged, and most
    that do are (the rest repeat an item twice before the cap, or loop with changing words or numbers: missed)."""
    rows = _rows("ordinary_answers.jsonl")
    assert len(rows) == 76 and {r["kind"] for r in rows} == {"code", "latin", "cyrillic", "cjk", "other"}
    wrong = [(r["id"], tail_repeat(r["answer"])) for r in rows if looping(r["answer"]) and not r["loops"]]
    assert not wrong
    looped = [r for r in rows if r["loops"]]
    assert sum(looping(r["answer"]) for r in looped) >= 0.75 * len(looped)  # 23 of 30 when written
