"""Load task and preference-pair datasets (Parquet or JSONL + audio) with row-level errors.

A bad row never turns into a silent empty prompt: it raises `DatasetError` naming the file, the
row, the field and what was expected, or - with `on_bad_row="skip"` - is dropped, logged and
counted in the returned set's `skipped` list.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_cluster.audio import AudioError, load_audio

log = logging.getLogger(__name__)
ROLES = ("user", "assistant", "system")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used."""


@dataclass
class Turn:
    role: str
    text: str
    audio: torch.Tensor | None = None  # float32 mono 16 kHz
    transcript: str | None = None


@dataclass
class Task:
    prompt_id: str
    turns: list[Turn]
    answer: str | None = None
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)  # every other column, e.g. emotion


@dataclass
class Pair:
    pair_id: str
    prompt_id: str
    turns: list[Turn]
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)  # e.g. kind, emotion


class _RowSet:
    """Iterates, indexes and measures like the list of loaded rows."""

    def _rows(self) -> list:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._rows())

    def __iter__(self):
        return iter(self._rows())

    def __getitem__(self, i):
        return self._rows()[i]


@dataclass
class TaskSet(_RowSet):
    tasks: list[Task]
    skipped: list[str] = field(default_factory=list)  # messages of rows dropped in skip mode

    def _rows(self) -> list[Task]:
        return self.tasks


@dataclass
class PairSet(_RowSet):
    pairs: list[Pair]
    skipped: list[str] = field(default_factory=list)

    def _rows(self) -> list[Pair]:
        return self.pairs


class _BadRow(Exception):
    def __init__(self, field_name: str, expected: str):
        super().__init__(field_name, expected)
        self.field_name, self.expected = field_name, expected


def _read_rows(path: Path) -> list[tuple[str, dict | None, str | None]]:
    """(row label, row dict or None, parse error) for every row of a Parquet/JSONL file."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file does not exist; "
                           "expected a .parquet or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # arrow raises several types for a corrupt file
            raise DatasetError(f"{path}: cannot read as Parquet ({exc})") from None
        return [(f"row {i}", row, None) for i, row in enumerate(rows)]
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append((f"row {len(out)} (line {n})", None, f"invalid JSON ({exc.msg})"))
                continue
            if not isinstance(row, dict):
                out.append((f"row {len(out)} (line {n})", None, "expected a JSON object"))
                continue
            out.append((f"row {len(out)} (line {n})", row, None))
        return out
    raise DatasetError(f"{path}: unknown dataset suffix {path.suffix!r}; "
                       "expected .parquet or .jsonl")


def _string(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(name, f"a non-empty string, got {value!r}")
    return value


def _turn(raw, j: int, base_dir: Path, where: str) -> Turn:
    name = f"turns[{j}]"
    if not isinstance(raw, dict):
        raise _BadRow(name, f"an object with role/text/audio, got {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise _BadRow(f"{name}.role", f"one of {', '.join(ROLES)}, got {role!r}")
    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise _BadRow(f"{name}.text", f"a string, got {type(text).__name__}")
    audio_bytes, audio_path = raw.get("audio"), raw.get("audio_path")
    if isinstance(audio_bytes, str):  # JSONL may put a path directly in `audio`
        audio_bytes, audio_path, source_field = None, audio_bytes, "audio"
    else:
        source_field = "audio_path"
    audio = None
    try:
        if audio_bytes is not None:
            audio = load_audio(audio_bytes, where=f"{where} field {name}.audio",
                               sample_rate=raw.get("sample_rate"))
        elif audio_path is not None:
            p = Path(audio_path)
            audio = load_audio(p if p.is_absolute() else base_dir / p,
                               where=f"{where} field {name}.{source_field}",
                               sample_rate=raw.get("sample_rate"))
    except AudioError as exc:
        raise DatasetError(str(exc)) from None
    if not (text and text.strip()) and audio is None:
        raise _BadRow(name, "text or audio (audio bytes or audio_path); got neither")
    transcript = raw.get("transcript")
    return Turn(role=role, text=text or "", audio=audio,
                transcript=transcript if isinstance(transcript, str) else None)


def _turns(row: dict, base_dir: Path, where: str) -> list[Turn]:
    raw = row.get("turns")
    if not isinstance(raw, list) or not raw:
        raise _BadRow("turns", f"a non-empty list of turns, got {raw!r}")
    return [_turn(t, j, base_dir, where) for j, t in enumerate(raw)]


def _load(path, on_bad_row: str, id_field: str, build) -> tuple[list, list[str]]:
    """Shared row loop: parse, validate with `build(row, where)`, check ids, fail or skip."""
    if on_bad_row not in ("fail", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r}: expected 'fail' or 'skip'")
    path = Path(path)
    good, skipped, seen = [], [], {}
    for label, row, parse_error in _read_rows(path):
        where = f"{path} {label}"
        try:
            if parse_error is not None:
                raise DatasetError(f"{where}: {parse_error}")
            item = build(row, path.parent, where)
            key = getattr(item, id_field)
            if key in seen:
                raise _BadRow(id_field, f"a unique id, but {key!r} was already used by {seen[key]}")
            seen[key] = label
            good.append(item)
        except (_BadRow, DatasetError) as exc:
            msg = (f"{where} field {exc.field_name}: expected {exc.expected}"
                   if isinstance(exc, _BadRow) else str(exc))
            if on_bad_row == "fail":
                raise DatasetError(msg) from None
            log.warning("skipping bad row: %s", msg)
            skipped.append(msg)
    if skipped:
        log.warning("%s: skipped %d bad row(s), kept %d", path, len(skipped), len(good))
    return good, skipped


def _task(row: dict, base_dir: Path, where: str) -> Task:
    prompt_id = _string(row, "prompt_id")
    turns = _turns(row, base_dir, where)
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int)):
        raise _BadRow("answer", f"a string or null, got {type(answer).__name__}")
    choices = row.get("choices")
    if choices is not None and (not isinstance(choices, list)
                                or not all(isinstance(c, str) for c in choices)):
        raise _BadRow("choices", f"a list of strings or null, got {choices!r}")
    if not any(t.role == "user" for t in turns):
        raise _BadRow("turns", "at least one user turn; the dialogue has none")
    _dialogue_fields(row, turns)
    meta = {k: v for k, v in row.items() if k not in ("prompt_id", "turns", "answer", "choices")}
    return Task(prompt_id=prompt_id, turns=turns, answer=None if answer is None else str(answer),
                choices=choices, meta=meta)


def _dialogue_fields(row: dict, turns: list[Turn]) -> None:
    """Optional multi-turn task fields: one `turn_answers` entry per user segment (consecutive
    user/system turns answered by one assistant turn), `rubric` items, paralinguistic `labels`."""
    answers = row.get("turn_answers")
    if answers is not None:
        if not isinstance(answers, list) or not all(isinstance(a, (str, int)) for a in answers):
            raise _BadRow("turn_answers", f"a list of strings (one per user turn), got {answers!r}")
        segments, open_ = 0, False
        for turn in turns:
            if turn.role != "assistant" and not open_:
                segments += 1
            open_ = turn.role != "assistant"
        if len(answers) != segments:
            raise _BadRow("turn_answers", f"{segments} answer(s), one per user turn, got {len(answers)}")
    rubric = row.get("rubric")
    if rubric is not None and (not isinstance(rubric, list) or not all(isinstance(r, str) for r in rubric)):
        raise _BadRow("rubric", f"a list of strings (rubric items), got {rubric!r}")
    labels = row.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise _BadRow("labels", f"an object of paralinguistic labels (e.g. emotion), got {labels!r}")


def _pair(row: dict, base_dir: Path, where: str) -> Pair:
    pair_id, prompt_id = _string(row, "pair_id"), _string(row, "prompt_id")
    turns = _turns(row, base_dir, where)
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    meta = {k: v for k, v in row.items()
            if k not in ("pair_id", "prompt_id", "turns", "chosen", "rejected")}
    return Pair(pair_id=pair_id, prompt_id=prompt_id, turns=turns, chosen=chosen,
                rejected=rejected, meta=meta)


def load_tasks(path, on_bad_row: str = "fail") -> TaskSet:
    """Tasks from .parquet/.jsonl; audio paths resolve against the dataset file's directory."""
    tasks, skipped = _load(path, on_bad_row, "prompt_id", _task)
    return TaskSet(tasks=tasks, skipped=skipped)


def load_pairs(path, on_bad_row: str = "fail") -> PairSet:
    """Preference pairs (chosen/rejected replies to the same turns), validated like tasks."""
    pairs, skipped = _load(path, on_bad_row, "pair_id", _pair)
    return PairSet(pairs=pairs, skipped=skipped)
