"""Dataset loading: good rows decode, bad rows fail loudly (file, row, field) or are skipped and counted."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from rlhf_cluster.audio import encode_wav
from rlhf_cluster.data.synthetic import TASKS_SCHEMA, generate_synthetic
from rlhf_cluster.data.tasks import DatasetError, Task, load_pairs, load_tasks

WAV = encode_wav(0.1 * np.sin(np.arange(3200) / 5.0))  # 0.2 s at 16 kHz


def _turn(**kw):
    base = dict(role="user", text="how many syllables did i say ?", audio=None, audio_path=None,
                sample_rate=None, transcript=None)
    return {**base, **kw}


def _row(pid, turns, answer="2"):
    return dict(prompt_id=pid, turns=turns, answer=answer, choices=["1", "2", "3"],
                emotion="calm", num_syllables=2)


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=TASKS_SCHEMA), path)
    return path


def test_loads_synthetic_tasks_and_pairs(tmp_path):
    paths = generate_synthetic(tmp_path, num_tasks=4, seed=3)
    tasks = load_tasks(paths["tasks"])
    assert len(tasks) == 4 and tasks.skipped == []
    t = tasks[0]
    assert isinstance(t, Task) and t.prompt_id == "syn-000000" and t.choices == ["1", "2", "3"]
    assert t.meta == {"emotion": "happy", "num_syllables": int(t.answer)}
    audio = t.turns[0].audio
    assert audio.dtype == torch.float32 and audio.dim() == 1 and audio.numel() > 1600
    pairs = load_pairs(paths["pairs"])
    assert len(pairs) == 8 and {p.meta["kind"] for p in pairs} == {"tone_deaf", "wrong_answer"}
    assert all(p.chosen != p.rejected and p.turns[0].audio is not None for p in pairs)


def test_audio_path_resolves_relative_to_dataset_and_resamples(tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.flac", np.zeros((4410, 2), np.float32), 44100, format="FLAC")
    path = _write(tmp_path / "tasks.parquet", [
        _row("a", [_turn(audio_path="clips/a.flac")]),
        _row("b", [_turn(audio=WAV, sample_rate=16000), _turn(role="assistant", text="sure .")]),
    ])
    tasks = load_tasks(path)
    assert abs(tasks[0].turns[0].audio.numel() - 1600) <= 1
    assert tasks[1].turns[1].audio is None and tasks[1].turns[1].text == "sure ."


def test_missing_audio_file_names_row_and_field(tmp_path):
    path = _write(tmp_path / "tasks.parquet", [
        _row("ok", [_turn(audio=WAV)]),
        _row("bad", [_turn(text="hello"), _turn(audio_path="missing.wav")]),
    ])
    with pytest.raises(DatasetError) as err:
        load_tasks(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} row 1 field turns[1].audio_path:")
    assert "missing.wav" in msg and "does not exist" in msg


def test_corrupt_audio_bytes_names_row_and_field(tmp_path):
    path = _write(tmp_path / "tasks.parquet", [_row("x", [_turn(audio=b"RIFF garbage" * 20)])])
    with pytest.raises(DatasetError, match=r"row 0 field turns\[0\]\.audio: cannot decode .*expected WAV/FLAC"):
        load_tasks(path)


@pytest.mark.parametrize("turns, field", [
    ([], "turns"),
    ([_turn(role="robot")], r"turns\[0\]\.role"),
    ([_turn(text=None)], r"turns\[0\]"),
])
def test_bad_turns_are_named_errors(tmp_path, turns, field):
    path = _write(tmp_path / "tasks.parquet", [_row("x", turns)])
    with pytest.raises(DatasetError, match=rf"tasks\.parquet row 0 field {field}: expected"):
        load_tasks(path)


def test_skip_mode_skips_counts_and_logs(tmp_path, caplog):
    path = _write(tmp_path / "tasks.parquet", [
        _row("a", [_turn(audio=WAV)]),
        _row("b", []),
        _row("c", [_turn(audio=b"junk")]),
        _row("a", [_turn()]),  # duplicate id
        _row(None, [_turn()]),
        _row("d", [_turn()]),
    ])
    with caplog.at_level(logging.WARNING, logger="rlhf_cluster.data.tasks"):
        tasks = load_tasks(path, on_bad_row="skip")
    assert [t.prompt_id for t in tasks] == ["a", "d"]
    assert len(tasks.skipped) == 4
    assert "row 1 field turns" in tasks.skipped[0]
    assert "row 2 field turns[0].audio" in tasks.skipped[1]
    assert "row 3 field prompt_id" in tasks.skipped[2] and "already used by row 0" in tasks.skipped[2]
    assert "row 4 field prompt_id" in tasks.skipped[3]
    for msg in tasks.skipped:
        assert msg in caplog.text
    with pytest.raises(DatasetError, match="row 1 field turns"):
        load_tasks(path)


def test_jsonl_with_audio_paths(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    sf.write(sub / "rel.wav", np.zeros(8000, np.float32), 8000)
    sf.write(tmp_path / "abs.wav", np.zeros(1600, np.float32), 16000)
    lines = [
        {"prompt_id": "r", "turns": [{"role": "user", "text": "hi", "audio_path": "rel.wav"}], "answer": 3},
        "",
        {"prompt_id": "s", "turns": [{"role": "user", "audio": str(tmp_path / "abs.wav")}], "tag": "x"},
        {"prompt_id": "t", "turns": [{"role": "user", "audio_path": "gone.wav"}]},
    ]
    path = sub / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\nnot json\n")
    tasks = load_tasks(path, on_bad_row="skip")
    assert [t.prompt_id for t in tasks] == ["r", "s"]
    assert tasks[0].answer == "3" and tasks[0].turns[0].audio.numel() == 16000
    assert tasks[1].meta == {"tag": "x"} and tasks[1].turns[0].text == ""
    assert len(tasks.skipped) == 2
    assert "row 2 (line 4) field turns[0].audio_path" in tasks.skipped[0]
    assert "line 5" in tasks.skipped[1] and "invalid JSON" in tasks.skipped[1]


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="nope.parquet.*does not exist"):
        load_tasks(tmp_path / "nope.parquet")
    (tmp_path / "tasks.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"tasks\.csv.*unknown dataset suffix"):
        load_tasks(tmp_path / "tasks.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"broken\.parquet: cannot read as Parquet"):
        load_tasks(tmp_path / "broken.parquet", on_bad_row="skip")


def test_pairs_validation(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"pair_id": "p0", "prompt_id": "x", "turns": [{"role": "user", "text": "hi"}],
            "chosen": "sure .", "rejected": "no", "kind": "tone_deaf"}
    bad = {**good, "pair_id": "p1", "rejected": ""}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DatasetError, match=r"row 1 \(line 2\) field rejected: expected a non-empty string"):
        load_pairs(path)
    pairs = load_pairs(path, on_bad_row="skip")
    assert [p.pair_id for p in pairs] == ["p0"] and pairs[0].meta == {"kind": "tone_deaf"}
    assert len(pairs.skipped) == 1
