"""Rubric-judge output parsing: the honest forms parse, anything doubtful is None (pure logic)."""

import pytest

from reward_services.rubric import build_judge_prompt, parse_verdicts

ITEMS = ["Acknowledges the user's emotion", "Answers the question", "Keeps it short"]
YES_NO_YES = {"rubric.0": 1.0, "rubric.1": 0.0, "rubric.2": 1.0, "rubric": pytest.approx(2 / 3)}


@pytest.mark.parametrize("text", [
    "1. yes\n2. no\n3. yes",
    "1. YES\n2. No\n3. PASS",
    "1) yes\n2) fail\n3) true",
    "1: 1\n2: 0\n3: 1",
    "Item 1: yes\nItem 2: no\nitem 3: passed",
    "Criterion 1 - yes\nCriterion 2 - no\nCriterion 3 - yes",
    "**1.** **Yes**\n**2.** No\n**3.** Yes",
    "- [x] Acknowledges the user's emotion\n- [ ] Answers the question\n- [X] Keeps it short",
    "[x] one\n[ ] two\n[x] three",
    "1. [x] a\n2. [ ] b\n3. [x] c",
    "Acknowledges the user's emotion: PASS\nAnswers the question: FAIL\nkeeps it short: true",
    "- Answers the question: no\n- Keeps it short: yes\n- Acknowledges the user's emotion: yes",
    "1. Acknowledges the user's emotion - yes\n2. Answers the question: no\n3. Keeps it short = pass.",
    '{"verdicts": [true, false, true]}',
    '{"verdicts": ["yes", "no", 1]}',
    '[true, false, true]',
    '```json\n{"verdicts": [true, false, true]}\n```',
    'The reply says sorry, but gives no answer.\n{"verdicts": [true, false, true]}',
    "Let me check each item.\nThe user sounds sad; the reply notices.\n\n1. yes\n2. no\n3. yes\n",
    "1. yes\n2. no\n3. yes\n\nSummary: 1. yes",  # a repeated, consistent verdict is fine
    "3. yes\n1. yes\n2. no",  # order does not matter
    "1. Yes, it says it is sorry.\n2. No - it never answers.\n3. Yes.",
])
def test_accepted_forms(text):
    assert parse_verdicts(text, ITEMS) == YES_NO_YES


@pytest.mark.parametrize("text", [
    "",
    "   \n  ",
    "garbage",
    "1. yes\n2. no",  # item 3 missing
    "1. yes\n2. no\n3. maybe",
    "1. yes\n2. no\n3. yes\n4. no",  # no item 4
    "0. yes\n1. no\n2. yes",  # 0 is out of range, 3 missing
    "1. yes\n1. no\n2. yes\n3. yes",  # conflicting verdicts
    "- [x] a\n- [ ] b\n- [x] c\n- [x] d",  # more checkboxes than items
    "1. The reply is warm.\n2. The reply is short.\n3. It answers.",  # no verdict words
    "1. yesterday\n2. nothing\n3. truely",
    '{"verdicts": [true, false',
    '{"verdicts": [true, false]}',
    '{"verdicts": [true, false, "maybe"]}',
    '{"verdicts": [true, false, 2]}',
    '{"verdicts": [true, false, null]}',
    '{"scores": [true, false, true]}',
    '"yes"',
    "Acknowledges the user's emotion: PASS\nAnswers the question: FAIL",
])
def test_doubtful_output_is_none(text):
    assert parse_verdicts(text, ITEMS) is None


def test_single_item_and_all_fail():
    assert parse_verdicts("1. no", ["x"]) == {"rubric.0": 0.0, "rubric": 0.0}
    assert parse_verdicts("Not met", ["x"]) is None  # no item reference at all
    assert parse_verdicts("1. not met\n2. unmet\n3. no", ITEMS)["rubric"] == 0.0


def test_non_string_and_empty_rubric():
    assert parse_verdicts(None, ITEMS) is None
    with pytest.raises(ValueError):
        parse_verdicts("1. yes", [])


def test_prompt_numbers_items_and_asks_for_the_parsed_form():
    prompt = build_judge_prompt(ITEMS, "user: I failed my exam.\nassistant: Sorry to hear that.")
    assert "1. Acknowledges the user's emotion\n2. Answers the question\n3. Keeps it short" in prompt
    assert "I failed my exam" in prompt and "exactly 3 lines" in prompt
    example = prompt[prompt.index("1. yes"):]
    assert parse_verdicts("1. yes\n2. no\n3. yes", ITEMS) is not None and "2. no" in example
    with pytest.raises(ValueError):
        build_judge_prompt([], "x")
