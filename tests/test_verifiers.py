"""Verifiers and VerifierService: pure logic, no Ray."""

import functools

import pytest

from reward_services.verifier_service import VerifierService
from reward_services.verifiers import VERIFIERS, parse_number, split_reasoning

GOOD = "<think> i count 3 syllables , voice sounds sad </think> sorry that sounds hard . the answer is 3"
TASK = {"answer": "3", "choices": None}
MC = {"answer": "B", "choices": ["happy", "sad", "angry"]}


def v(name, response, task=TASK):
    return VERIFIERS[name](response, task)


def test_builtin_reply_scores_full_marks():
    assert {name: v(name, GOOD) for name in VERIFIERS if name not in ("multiple_choice", "speech_span")} == {
        "reasoning_present": 1.0, "format": 1.0, "exact_match": 1.0, "numeric": 1.0,
        "correct": 1.0, "length_guard": 1.0}


@pytest.mark.parametrize("response, expected", [
    (GOOD, ("i count 3 syllables , voice sounds sad", "sorry that sounds hard . the answer is 3")),
    ("no think at all . 3", (None, "no think at all . 3")),
    ("<think> cut off by the token limit 3", (None, "")),  # truncated reasoning is no answer
    ("<think></think> 3", ("", "3")),
    ("a lone close tag </think> 3", (None, "3")),
    ("<think> a </think> b <|im_end|><|endoftext|>", ("a", "b")),
    ("  <think>\n a \n</think>\n\n b \n", ("a", "b")),
])
def test_split_reasoning(response, expected):
    assert split_reasoning(response) == expected


def test_lone_close_tag_is_reasoning_only_when_the_template_opened_the_block():
    text = "reasoning from the template </think> 3"
    assert split_reasoning(text, think_opened=True) == ("reasoning from the template", "3")
    assert v("reasoning_present", text) == 0.0
    assert VERIFIERS["reasoning_present"](text, {"answer": "3", "think_opened_in_prompt": True}) == 1.0


@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0), ("<think> x </think>", 1.0), ("<think></think> 3", 0.0), ("<think>   </think> 3", 0.0),
    ("<think> unterminated", 0.0), ("3", 0.0),
])
def test_reasoning_present(response, expected):
    assert v("reasoning_present", response) == expected


@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0),
    ("<think></think> 3", 1.0),  # structure only; emptiness is reasoning_present's job
    (" \n<think> a </think> 3 <|im_end|>", 1.0),
    ("<think> a </think>", 0.0),  # empty final
    ("<think> a </think> <|im_end|>", 0.0),
    ("hello <think> a </think> 3", 0.0),  # not at the start
    ("<think> a </think> <think> b </think> 3", 0.0),
    ("<think> a </think> 3 </think>", 0.0),
    ("<think> a 3", 0.0),
    ("a </think> 3", 0.0),
    ("3", 0.0),
])
def test_format(response, expected):
    assert v("format", response) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("<think> x </think>  The Sad  Voice. ", "the sad voice", 1.0),
    ("<think> x </think> \"sad\"", "Sad", 1.0),
    ("<think> x </think> sorry . the answer is: Sad !", "sad", 1.0),
    ("<think> x </think> Answer: sad", "sad", 1.0),
    ("<think> x </think> the answer is happy", "sad", 0.0),
    ("<think> the answer is sad </think> happy", "sad", 0.0),  # reasoning never counts
    ("<think> the answer is sad", "sad", 0.0),
    ("<think> x </think>", "sad", 0.0),
    ("<think> x </think> -2", "2", 0.0),  # a sign is not surrounding punctuation
])
def test_exact_match(response, answer, expected):
    assert v("exact_match", response, {"answer": answer}) == expected


@pytest.mark.parametrize("response", [
    "b", "B", "(b)", "( B )", "b.", "B)", "option b", "Option B", "answer: B", "the answer is b",
    "the answer is (b) sad", "b) sad", "i think it is b", "sad", "SAD.", "the voice sounds sad",
    "<think> could be a or c </think> the answer is b", "choice b", "\\boxed{B}",
])
def test_multiple_choice_accepts_letter_or_text(response):
    assert v("multiple_choice", response, MC) == 1.0
    assert v("multiple_choice", response, {**MC, "answer": "sad"}) == 1.0  # answer given as text
    assert v("multiple_choice", response, {**MC, "answer": "(b)"}) == 1.0


@pytest.mark.parametrize("response", [
    "a", "c", "happy", "option d", "happy or sad", "it is a happy voice", "the answer is a",
    "<think> the answer is b </think> a", "<think> b", "", "i am not sure",
])
def test_multiple_choice_rejects(response):
    assert v("multiple_choice", response, MC) == 0.0


def test_multiple_choice_letters_follow_choice_order_and_tolerate_arrays():
    task = {"answer": "C", "choices": ("x", "y", "z", "w")}
    assert v("multiple_choice", "the answer is z", task) == 1.0
    assert v("multiple_choice", "option d", {**task, "answer": "w"}) == 1.0
    assert v("multiple_choice", "option e", {**task, "answer": "w"}) == 0.0


def test_builtin_task_with_numeric_choices():
    """The synthetic task: answer "3" among choices ["1", "2", "3"], so `correct` goes by choice."""
    task = {"answer": "3", "choices": ["1", "2", "3"], "emotion": "sad", "num_syllables": 3}
    for response in (GOOD, "the answer is three", "<think> x </think> 3.0", "the answer is c", "3 syllables"):
        assert v("correct", response, task) == 1.0
    for response in ("<think> i count 3 syllables , voice sounds sad </think> the answer is 2",
                     "2 or 3", "the answer is 4", "<think> i count 3 syllables"):
        assert v("correct", response, task) == 0.0


def test_multiple_choice_bad_task_is_loud():
    with pytest.raises(ValueError, match="neither an option letter"):
        v("multiple_choice", "b", {"answer": "purple", "choices": ["happy", "sad"]})
    with pytest.raises(ValueError, match="choices"):
        v("multiple_choice", "b", {"answer": "b", "choices": []})


@pytest.mark.parametrize("text, value", [
    ("3", 3.0), ("3.0", 3.0), ("1,000", 1000.0), ("1,234,567", 1234567.0), ("1e3", 1000.0),
    ("2.5E-1", 0.25), ("-2", -2.0), ("+2", 2.0), ("3/4", 0.75), ("3 / 4", 0.75), ("0.75", 0.75),
    (".5", 0.5), ("three", 3.0), ("Twenty", 20.0), ("zero", 0.0), ("3.", 3.0), ("(3)", 3.0),
    (" 7 ", 7.0), ("1/0", None), ("sad", None), ("3 syllables", None), ("", None), ("twenty one", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("final, answer, expected", [
    ("the answer is 1000", "1,000", 1.0), ("the answer is 1,000", "1000", 1.0),
    ("the answer is 1e3", "1000", 1.0), ("3/4", "0.75", 1.0), ("0.75", "3/4", 1.0),
    ("the answer is three", "3", 1.0), ("3", "three", 1.0), ("the answer is -2", "-2", 1.0),
    ("the answer is 2", "-2", 0.0), ("3.0000001", "3", 1.0), ("3.001", "3", 0.0),
    ("0", "0", 1.0), ("the answer is 0.0", "0", 1.0),
    ("i heard 3 syllables . thanks", "3", 1.0),  # the number is not in the last sentence
    ("2 or maybe 3 , the answer is 4 .", "4", 1.0), ("the answer is 4 , not 3", "4", 0.0),
    ("the answer is 3.5. great", "3.5", 1.0), ("no number here", "3", 0.0), ("", "3", 0.0),
    ("<audio_3> <audio_7>", "3", 0.0),  # speech tokens are not numbers
])
def test_numeric(final, answer, expected):
    assert v("numeric", f"<think> x </think> {final}", {"answer": answer}) == expected


def test_numeric_bad_answer_is_loud():
    with pytest.raises(ValueError, match="not a number"):
        v("numeric", "3", {"answer": "sad"})


@pytest.mark.parametrize("response, task, expected", [
    (GOOD, TASK, 1.0),
    ("<think> x </think> the answer is 4", TASK, 0.0),
    ("<think> x </think> the answer is three", TASK, 1.0),  # numeric path
    ("<think> x </think> option b", MC, 1.0),  # multiple-choice path
    ("<think> x </think> sad", MC, 1.0),
    ("<think> x </think> sorry that sounds hard . the voice is sad", {"answer": "the voice is sad"}, 1.0),
    ("<think> x </think> the answer is Sad.", {"answer": "sad", "choices": None}, 1.0),  # exact path
    ("<think> x </think> the answer is happy", {"answer": "sad"}, 0.0),
    ("<think> i count 3 syllables", TASK, 0.0),  # truncated: no answer yet
])
def test_correct_dispatch(response, task, expected):
    assert v("correct", response, task) == expected


@pytest.mark.parametrize("task", [{}, {"answer": None}, {"answer": "  "}])
def test_correct_without_answer_is_loud(task):
    with pytest.raises(ValueError, match="no answer"):
        v("correct", GOOD, task)


def test_length_guard():
    long_final = "<think> " + "w " * 200 + "</think> " + " ".join(["word"] * 64)
    assert v("length_guard", long_final) == 1.0  # reasoning length does not count
    assert v("length_guard", long_final + " more") == 0.0
    assert v("length_guard", GOOD, {"max_words": 9}) == 1.0
    assert v("length_guard", GOOD, {"max_words": 8}) == 0.0
    assert functools.partial(VERIFIERS["length_guard"], max_words=3)(GOOD, {}) == 0.0


def test_service_scores_every_configured_verifier():
    service = VerifierService(["correct", "reasoning_present"])
    items = [{"episode_id": "e0", "response": GOOD, "task": TASK},
             {"episode_id": "e1", "response": "3", "task": TASK},
             {"episode_id": "e2", "response": "<think> x </think> 4", "task": TASK}]
    assert service.score(items) == [{"correct": 1.0, "reasoning_present": 1.0},
                                    {"correct": 1.0, "reasoning_present": 0.0},
                                    {"correct": 0.0, "reasoning_present": 1.0}]
    assert service.score([]) == []


def test_service_reports_a_raising_verifier_per_item():
    service = VerifierService(["reasoning_present", "correct"])
    out = service.score([{"episode_id": "bad", "response": GOOD, "task": {"answer": None}},
                         {"episode_id": "ok", "response": GOOD, "task": TASK}])
    assert list(out[0]) == ["__error__"]
    assert "'correct'" in out[0]["__error__"] and "'bad'" in out[0]["__error__"]
    assert out[1] == {"reasoning_present": 1.0, "correct": 1.0}


def test_service_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'corect'.*allowed: .*'correct'"):
        VerifierService(["correct", "corect"])
    with pytest.raises(ValueError, match="at least one"):
        VerifierService([])


@pytest.mark.parametrize("name, response, task, expected", [
    ("numeric", "<think> x </think> \\boxed{1/2}", {"answer": "0.5"}, 1.0),  # boxed fraction
    ("numeric", "<think> x </think> \\boxed{ 2,500 }", {"answer": "2500.0"}, 1.0),
    ("numeric", "<think> x </think> the answer is\n\t 7 .", {"answer": " 7 "}, 1.0),  # whitespace
    ("exact_match", "<think> x </think> \n  SORRY   That Sounds  HARD \n", {"answer": "sorry that sounds hard"}, 1.0),
    ("exact_match", "<think> x </think> sorry that sounds hard", {"answer": "sorry that sounds"}, 0.0),
    ("multiple_choice", "<think> x </think>   ( C )  ", {"answer": "angry", "choices": ["happy", "sad", "angry"]}, 1.0),
    ("multiple_choice", "<think> x </think> ANGRY", {"answer": "c", "choices": ["happy", "sad", "angry"]}, 1.0),
    ("multiple_choice", "<think> x </think> angry", {"answer": "  Angry ", "choices": ["happy", "sad", "angry"]}, 1.0),
])
def test_whitespace_case_and_format_edge_cases(name, response, task, expected):
    assert v(name, response, task) == expected
