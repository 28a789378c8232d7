"""The built-in synthetic spoken task: deterministic, answerable, prosody-bearing, in-vocabulary."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlhf_cluster.audio import load_audio
from rlhf_cluster.data.synthetic import (EMOTIONS, EMPATHY, QUESTION, generate_synthetic,
                                         reference_reply)
from rlhf_cluster.tiny_model import UNK, build_tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    paths = generate_synthetic(out, num_tasks=24, seed=0)
    return paths, pq.read_table(paths["tasks"]).to_pylist(), pq.read_table(paths["pairs"]).to_pylist()


def _f0_track(x, sr=16000):
    """Frame-wise autocorrelation pitch (60-400 Hz) on the loud frames."""
    n, out = 640, []
    frames = [x[i : i + n] for i in range(0, len(x) - n, 320)]
    loudest = max(np.sqrt(np.mean(f**2)) for f in frames)
    for f in frames:
        if np.sqrt(np.mean(f**2)) < 0.3 * loudest:
            continue
        f = f - f.mean()
        r = np.correlate(f, f, "full")[n - 1 :]
        lo, hi = sr // 400, sr // 60
        out.append(sr / (lo + np.argmax(r[lo:hi])))
    return np.array(out)


def test_schema_and_contents(dataset):
    paths, tasks, pairs = dataset
    assert set(paths) == {"tasks", "pairs"} and all(p.is_file() for p in paths.values())
    assert len(tasks) == 24 and len(pairs) == 48
    assert {t["emotion"] for t in tasks} == set(EMOTIONS)
    schema = pq.read_schema(paths["tasks"])
    turn_fields = {f.name: str(f.type) for f in schema.field("turns").type.value_type}
    assert turn_fields == {"role": "string", "text": "string", "audio": "binary",
                           "audio_path": "string", "sample_rate": "int32", "transcript": "string"}
    for t in tasks:
        assert t["prompt_id"].startswith("syn-") and t["choices"] == ["1", "2", "3"]
        assert t["answer"] == str(t["num_syllables"]) and t["num_syllables"] in (1, 2, 3)
        (turn,) = t["turns"]
        assert turn["role"] == "user" and turn["text"] == QUESTION
        assert turn["transcript"] is None and turn["sample_rate"] == 16000
        wave = load_audio(turn["audio"], where=t["prompt_id"])
        assert 0.2 < wave.numel() / 16000 < 2.0
    assert len({t["prompt_id"] for t in tasks}) == 24
    assert {p["kind"] for p in pairs} == {"tone_deaf", "wrong_answer"}
    assert len({p["pair_id"] for p in pairs}) == 48


def test_replies_follow_templates(dataset):
    _, tasks, pairs = dataset
    by_id = {t["prompt_id"]: t for t in tasks}
    for p in pairs:
        t = by_id[p["prompt_id"]]
        k, emo = t["answer"], t["emotion"]
        assert p["chosen"] == reference_reply(t) == (
            f"<think> i count {k} syllables , voice sounds {emo} </think> {EMPATHY[emo]} the answer is {k}")
        assert p["rejected"] != p["chosen"] and p["emotion"] == emo
        assert p["turns"] == t["turns"]
        if p["kind"] == "wrong_answer":
            assert not p["rejected"].endswith(f"the answer is {k}")
        else:
            assert p["rejected"].endswith(f"the answer is {k}")
            assert EMPATHY[emo] not in p["rejected"]


def test_no_unknown_words(dataset):
    _, tasks, pairs = dataset
    tok = build_tokenizer()
    unk = tok.convert_tokens_to_ids(UNK)
    texts = [QUESTION, *EMPATHY.values()]
    texts += [turn["text"] for t in tasks for turn in t["turns"]]
    texts += [s for p in pairs for s in (p["chosen"], p["rejected"])]
    for text in texts:
        assert unk not in tok(text, add_special_tokens=False)["input_ids"], text


def test_deterministic_per_seed(dataset, tmp_path):
    _, tasks, pairs = dataset
    same = generate_synthetic(tmp_path / "a", num_tasks=24, seed=0)
    other = generate_synthetic(tmp_path / "b", num_tasks=24, seed=1)
    same_tasks = pq.read_table(same["tasks"]).to_pylist()
    assert same_tasks == tasks and pq.read_table(same["pairs"]).to_pylist() == pairs
    other_audio = [t["turns"][0]["audio"] for t in pq.read_table(other["tasks"]).to_pylist()]
    assert all(a != t["turns"][0]["audio"] for a, t in zip(other_audio, tasks))


def test_num_pairs_override(tmp_path):
    paths = generate_synthetic(tmp_path, num_tasks=3, seed=0, num_pairs=5)
    assert pq.read_table(paths["pairs"]).num_rows == 5


def test_emotions_differ_in_measured_pitch_and_energy(dataset):
    _, tasks, _ = dataset
    f0, rms, slope = {e: [] for e in EMOTIONS}, {e: [] for e in EMOTIONS}, {e: [] for e in EMOTIONS}
    for t in tasks:
        x = load_audio(t["turns"][0]["audio"], where=t["prompt_id"]).numpy()
        track = _f0_track(x)
        f0[t["emotion"]].append(track.mean())
        slope[t["emotion"]].append(track[-2:].mean() / track[:2].mean())
        rms[t["emotion"]].append(np.sqrt(np.mean(x[np.abs(x) > 0.01] ** 2)))
    assert min(f0["happy"]) > max(f0["sad"])
    assert min(f0["angry"]) > max(f0["calm"]) > max(f0["sad"])
    assert min(rms["angry"]) > max(rms["calm"])
    assert min(rms["happy"]) > max(rms["sad"])
    assert min(slope["happy"]) > 1.1 and max(slope["sad"]) < 0.9  # rising vs falling
    assert all(0.95 < s < 1.05 for s in slope["calm"] + slope["angry"])  # flat
