"""Verifiable rewards: pure functions `(response, task) -> float`.

A task carries `answer` (str | None), `choices` (list[str] | None) and any meta. Answer
checkers look only at the final part (after `</think>`), so a model cannot score by listing
candidates while it reasons. A task the checker cannot judge (no answer, an answer that is
not one of the choices) raises ValueError: a bad row must be loud, never a silent 0.
"""

from __future__ import annotations

import math
import re
from typing import Callable

THINK, END_THINK = "<think>", "</think>"  # as in rlhf_cluster.tiny_model, without importing torch

_CONTROL = re.compile(r"<\|[^|<>]*\|>")  # chat framing such as <|im_end|>: never content
_SENTENCE_END = re.compile(r"[.!?\n](?=\s|$)")  # "3.5" is not a sentence end, "3 ." is
_CUE = re.compile(r"\b(?:final\s+)?answer\b\s*(?:is\b|was\b|would\s+be\b|[:=])?", re.I)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SURROUNDING = " \t\r\n.,;:!?\"'`()[]{}"  # not "-" or "+": "-2" must not become "2"
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve "
                 "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d*\.\d+|\d+)(?:e[-+]?\d+)?(?:\s*/\s*\d+)?(?!\w)"
    r"|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.I)
_LETTER_AFTER_WORD = re.compile(r"\b(?:option|choice|letter)\s*\(?([a-z])\b")
_LETTER_IN_PARENS = re.compile(r"\(([a-z])\)")
_LETTER_LEADING = re.compile(r"^([a-z])(?:[.):]\s|$)")  # "b", "b) happy"; not "a happy voice"
_LETTER_TRAILING = re.compile(r"\s([a-z])$")  # "i pick b"

Verifier = Callable[[str, dict], float]


def split_reasoning(response: str, think_opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, final), both stripped, chat control tokens removed.

    An unterminated `<think>` gives (None, ""): reasoning cut off by the token limit is not
    an answer. A `</think>` without `<think>` counts as closing a block only when the chat
    template opened it in the prompt (`think_opened`, DeepSeek-R1 style); otherwise a lone
    `</think>` is no reasoning (a policy learns to emit one to farm the reasoning reward).
    """
    text = _CONTROL.sub(" ", response)
    close = text.find(END_THINK)
    if close < 0:
        return (None, "") if THINK in text else (None, text.strip())
    open_ = text.find(THINK)
    if 0 <= open_ < close:
        reasoning = text[open_ + len(THINK):close].strip()
    else:
        reasoning = text[:close].strip() if think_opened else None
    return reasoning, text[text.rfind(END_THINK) + len(END_THINK):].strip()


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(_SURROUNDING)


def _answer_span(final: str) -> str:
    """The last answer-like phrase: a \\boxed{} value, else the rest of the sentence after the
    last "answer is"/"answer:" cue, else the last sentence."""
    boxed = _BOXED.findall(final)
    if boxed:
        return boxed[-1]
    for cue in reversed(list(_CUE.finditer(final))):
        phrase = _SENTENCE_END.split(final[cue.end():], maxsplit=1)[0]
        if _normalise(phrase):
            return phrase
    sentences = [s for s in _SENTENCE_END.split(final) if _normalise(s)]
    return sentences[-1] if sentences else ""


def _to_float(token: str) -> float | None:
    token = token.lower().replace(",", "").replace(" ", "")
    if token in _NUMBER_WORDS:
        return float(_NUMBER_WORDS.index(token))
    num, _, den = token.partition("/")
    if den:
        return float(num) / float(den) if float(den) else None
    return float(num)


def parse_number(text: str) -> float | None:
    """The value of `text` if it is one number ("1,000", "1e3", "3/4", "three"), else None."""
    match = _NUMBER.fullmatch(text.strip().rstrip(_SURROUNDING).lstrip("([{\"'`"))
    return _to_float(match.group()) if match else None


def _last_number(text: str) -> float | None:
    tokens = _NUMBER.findall(text)
    return _to_float(tokens[-1]) if tokens else None


def _require_answer(task: dict) -> str:
    answer = task.get("answer")
    if answer is None or not _normalise(str(answer)):
        raise ValueError(f"task has no answer to check against (answer={answer!r})")
    return str(answer)


def _choice_index(text: str, choices: list[str]) -> int | None:
    """Which option `text` picks: by letter ("b", "(b)", "b.", "option b"), by its text, or by
    its value when options are numbers."""
    t = _normalise(text)
    letters = (_LETTER_AFTER_WORD.findall(t) or _LETTER_IN_PARENS.findall(t)
               or _LETTER_LEADING.findall(t) or _LETTER_TRAILING.findall(t))
    if letters and ord(letters[-1]) - ord("a") < len(choices):
        return ord(letters[-1]) - ord("a")
    texts = [_normalise(str(c)) for c in choices]
    if t in texts:
        return texts.index(t)
    value = parse_number(t)  # numeric options: "three" or "3.0" picks "3"
    if value is not None:
        same = [i for i, c in enumerate(choices) if parse_number(str(c)) == value]
        if same:
            return same[0]
    mentioned = [i for i, c in enumerate(texts)
                 if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", t)]
    return mentioned[0] if len(mentioned) == 1 else None


def reasoning_present(response: str, task: dict) -> float:
    return float(bool(split_reasoning(response, task.get("think_opened_in_prompt", False))[0]))


def format_ok(response: str, task: dict) -> float:
    """One think block, at the very start, then a non-empty final answer."""
    text = _CONTROL.sub(" ", response).strip()
    well_formed = text.startswith(THINK) and text.count(THINK) == 1 and text.count(END_THINK) == 1
    return float(well_formed and bool(split_reasoning(response)[1]))


def exact_match(response: str, task: dict) -> float:
    answer = _normalise(_require_answer(task))
    final = split_reasoning(response)[1]
    return float(answer in (_normalise(_answer_span(final)), _normalise(final)))


def multiple_choice(response: str, task: dict) -> float:
    choices = task.get("choices")
    if choices is None or len(choices) == 0:
        raise ValueError("multiple_choice needs task['choices']")
    answer = _require_answer(task)
    expected = _choice_index(answer, list(choices))
    if expected is None:
        raise ValueError(f"task answer {answer!r} is neither an option letter nor one of {list(choices)}")
    return float(_choice_index(_answer_span(split_reasoning(response)[1]), list(choices)) == expected)


def numeric(response: str, task: dict) -> float:
    answer = _require_answer(task)
    expected = parse_number(answer)
    if expected is None:
        raise ValueError(f"task answer {answer!r} is not a number")
    final = split_reasoning(response)[1]
    got = _last_number(_answer_span(final))
    if got is None:  # "i heard 3 syllables . thanks": the span is "thanks"
        got = _last_number(final)
    return float(got is not None and math.isclose(got, expected, rel_tol=1e-6))


def correct(response: str, task: dict) -> float:
    """The default checker: by choices if the task has them, numerically if the answer is a
    number, else by normalised exact match."""
    choices = task.get("choices")
    if choices is not None and len(choices) > 0:
        return multiple_choice(response, task)
    if parse_number(_require_answer(task)) is not None:
        return numeric(response, task)
    return exact_match(response, task)


def length_guard(response: str, task: dict, max_words: int = 64) -> float:
    """Final answer within `task["max_words"]` words (default `max_words`; bind another with
    functools.partial), so long rambling is not rewarded as a correct answer."""
    return float(len(split_reasoning(response)[1].split()) <= task.get("max_words", max_words))


_SPEECH_SPAN = re.compile(r"<tts_start>((?:\s*<audio_\d+>)*)\s*<tts_end>")


def speech_span(response: str, task: dict) -> float:
    """Step-Audio-style spoken reply: after the reasoning, exactly one `<tts_start>` speech
    span `<tts_end>` holding between `task["min_speech_tokens"]` (default 1) and
    `task["max_speech_tokens"]` (default 16) discrete speech tokens and nothing else."""
    final = split_reasoning(response)[1]
    spans = _SPEECH_SPAN.findall(final)
    if len(spans) != 1 or final.count("<tts_start>") != 1 or final.count("<tts_end>") != 1:
        return 0.0
    n = len(re.findall(r"<audio_\d+>", spans[0]))
    return float(task.get("min_speech_tokens", 1) <= n <= task.get("max_speech_tokens", 16))


VERIFIERS: dict[str, Verifier] = {
    "reasoning_present": reasoning_present,
    "format": format_ok,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "numeric": numeric,
    "correct": correct,
    "length_guard": length_guard,
    "speech_span": speech_span,
}
