"""Generative rubric judges: the prompt we send and a strict parser for what comes back.

A judge LLM answers free text, and free text fails in many ways. The parser accepts the
common honest forms (numbered lines, checkboxes, "item: PASS", a JSON verdict list) and
returns None whenever any rubric item lacks a clear verdict or verdicts conflict: the
caller counts that as a judge failure, never as a zero score (ARCHITECTURE.md, invariant 6).
"""

from __future__ import annotations

import json
import re

_TRUE = {"yes", "y", "pass", "passed", "true", "1", "met", "satisfied"}
_FALSE = {"no", "n", "fail", "failed", "false", "0", "not met", "unmet"}
_VERDICT = r"(yes|no|pass(?:ed)?|fail(?:ed)?|true|false|1|0|met|not met|unmet|satisfied)"
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_JSON_OBJECT = re.compile(r'\{[^{}]*"verdicts"[^{}]*\}', re.S)  # one after the judge's reasoning
_MARKUP = re.compile(r"[*_`]")  # markdown emphasis: "**1.** **Yes**"
_CHECKBOX = re.compile(r"^(?:[-*+]\s*)?(?:(\d+)\s*[.):]\s*)?\[([ xX✓✔]?)\]\s*(.*)$")
_NUMBERED = re.compile(r"^(?:[-*+]\s*)?(?:(?:item|criterion|rubric item)\s*#?\s*(\d+)\s*[.):\-–]?"
                       r"|#?(\d+)\s*[.):\-–])\s*(.*)$", re.I)
_LEADING_VERDICT = re.compile(r"^" + _VERDICT + r"(?![\w])", re.I)
_TRAILING_VERDICT = re.compile(r"[:\-–=]\s*" + _VERDICT + r"\s*[.!]?\s*$", re.I)
_TEXT_VERDICT = re.compile(r"^(?:[-*+]\s*)?(.+?)\s*[:\-–=]\s*" + _VERDICT + r"\s*[.!]?\s*$", re.I)


def build_judge_prompt(rubric_items: list[str], conversation_text: str) -> str:
    """Asks for the exact "N. yes|no" form the parser reads best, one line per item."""
    if not rubric_items:
        raise ValueError("a rubric needs at least one item")
    numbered = "\n".join(f"{i}. {item}" for i, item in enumerate(rubric_items, 1))
    return (
        "You are grading the assistant's side of a spoken dialogue against a rubric.\n\n"
        f"Conversation:\n{conversation_text}\n\n"
        f"Rubric:\n{numbered}\n\n"
        "For each rubric item decide whether the assistant satisfies it. Reply with exactly "
        f"{len(rubric_items)} lines and nothing else, one per item, in the form\n"
        "1. yes\n2. no\n"
        "using only the word yes or no after each item number."
    )


def _word(verdict: str) -> float:
    verdict = " ".join(verdict.lower().split())
    return 1.0 if verdict in _TRUE else 0.0


def _scores(values: list[float]) -> dict[str, float]:
    out = {f"rubric.{i}": v for i, v in enumerate(values)}
    out["rubric"] = sum(values) / len(values)
    return out


def _parse_json(text: str, n: int) -> list[float] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    verdicts = data.get("verdicts") if isinstance(data, dict) else data
    if not isinstance(verdicts, list) or len(verdicts) != n:
        return None
    values = []
    for v in verdicts:
        if isinstance(v, bool) or v in (0, 1):  # 1.0/0 as numbers, True/False as booleans
            values.append(float(v))
        elif isinstance(v, str) and " ".join(v.lower().split()) in _TRUE | _FALSE:
            values.append(_word(v))
        else:
            return None
    return values


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .:;,-")


def parse_verdicts(text: str, items: list[str]) -> dict[str, float] | None:
    """Per-item 1.0/0.0 as `rubric.<0-based index>` plus `rubric` (their mean), or None.

    None means: empty or malformed output, an item without a verdict, an item number out of
    range, more checkboxes than items, or two different verdicts for one item.
    """
    if not items:
        raise ValueError("a rubric needs at least one item")
    if not isinstance(text, str) or not text.strip():
        return None
    body = _FENCE.sub("", text.strip())
    embedded = _JSON_OBJECT.search(body)
    json_text = body if body.startswith("{") else embedded.group(0) if embedded else None
    if json_text is None and body.startswith("["):  # a bare JSON list, or a "[x] item" checkbox
        json_text = body if _is_json(body) else None
    if json_text is not None:  # a JSON answer is all or nothing
        values = _parse_json(json_text, len(items))
        return None if values is None else _scores(values)
    by_text = {_norm(item): i for i, item in enumerate(items)}
    found: dict[int, float] = {}
    checkboxes = 0

    def record(index: int, value: float) -> bool:
        if not 0 <= index < len(items) or found.get(index, value) != value:
            return False
        found[index] = value
        return True

    for raw in body.splitlines():
        line = _MARKUP.sub("", raw).strip()
        if not line:
            continue
        box = _CHECKBOX.match(line)
        if box:
            number, mark, label = box.groups()
            if number:
                index = int(number) - 1
            elif _norm(label) in by_text:
                index = by_text[_norm(label)]
            else:
                index = checkboxes
            checkboxes += 1
            if not record(index, 1.0 if mark.strip() else 0.0):
                return None
            continue
        numbered = _NUMBERED.match(line)
        if numbered:
            rest = numbered.group(3)
            verdict = _LEADING_VERDICT.match(rest) or _TRAILING_VERDICT.search(rest)
            if verdict:
                if not record(int(numbered.group(1) or numbered.group(2)) - 1, _word(verdict.group(1))):
                    return None
                continue
        labelled = _TEXT_VERDICT.match(line)
        if labelled and _norm(labelled.group(1)) in by_text:
            if not record(by_text[_norm(labelled.group(1))], _word(labelled.group(2))):
                return None
        # anything else is the judge's reasoning: ignored
    if len(found) != len(items):
        return None
    return _scores([found[i] for i in range(len(items))])
