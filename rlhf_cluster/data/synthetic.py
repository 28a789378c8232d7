"""The built-in synthetic spoken task: count the syllables, hear the mood.

A user "speaks" k in {1, 2, 3} syllables of procedurally made speech-like audio (a voiced
harmonic source shaped by formant resonances and a syllable envelope). The emotion (happy, sad,
angry, calm) lives only in the prosody - pitch level and contour, loudness, tempo - so a policy
must listen to answer well: the verifiable *content* is k, the *paralinguistic* part is whether
the reply's empathy fits the emotion. Everything is deterministic given (seed, index) and all
text uses only `tiny_model.WORDS`, so the tiny word-level tokenizer never emits `<unk>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_cluster.audio import SAMPLE_RATE, encode_wav

EMOTIONS = ("happy", "sad", "angry", "calm")
EMPATHY: dict[str, str] = {
    "happy": "great !",
    "sad": "sorry that sounds hard .",
    "angry": "i understand , okay .",
    "calm": "sure .",
}
QUESTION = "how many syllables did i say ?"
CHOICES = ["1", "2", "3"]
PAIR_KINDS = ("tone_deaf", "wrong_answer")

# Prosody per emotion: base f0 (Hz), f0 change over the utterance (fraction of base),
# RMS level while voiced, syllable length (s), gap between syllables (s).
PROSODY = {
    "happy": dict(f0=230.0, slope=+0.35, level=0.16, syllable=0.19, gap=0.08),
    "sad": dict(f0=115.0, slope=-0.30, level=0.05, syllable=0.25, gap=0.13),
    "angry": dict(f0=210.0, slope=0.0, level=0.28, syllable=0.15, gap=0.05),
    "calm": dict(f0=160.0, slope=0.0, level=0.07, syllable=0.21, gap=0.10),
}
# First three formants (Hz) of a few vowels, so syllables do not all sound alike.
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
          (570, 840, 2410)]

TURN_TYPE = pa.struct([
    ("role", pa.string()), ("text", pa.string()), ("audio", pa.binary()),
    ("audio_path", pa.string()), ("sample_rate", pa.int32()), ("transcript", pa.string()),
])
TASKS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("turns", pa.list_(TURN_TYPE)), ("answer", pa.string()),
    ("choices", pa.list_(pa.string())), ("emotion", pa.string()), ("num_syllables", pa.int32()),
])
PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt_id", pa.string()), ("turns", pa.list_(TURN_TYPE)),
    ("chosen", pa.string()), ("rejected", pa.string()), ("kind", pa.string()),
    ("emotion", pa.string()),
])


def speech_span(k: int | str, emotion: str) -> str:
    """A Step-Audio-style spoken answer: 2k discrete speech tokens, distinct per emotion."""
    base = EMOTIONS.index(emotion) * 16
    codes = " ".join(f"<audio_{base + (3 * j + int(k)) % 16}>" for j in range(2 * int(k)))
    return f"<tts_start> {codes} <tts_end>"


def _reply(k: int | str, emotion: str, empathy: str | None, speech: bool = False) -> str:
    head = f"<think> i count {k} syllables , voice sounds {emotion} </think>"
    tail = speech_span(k, emotion) if speech else None
    return " ".join(p for p in (head, empathy, f"the answer is {k}", tail) if p)


def reference_reply(task, speech: bool = False) -> str:
    """The chosen reply for a task (a dict row or anything with `.answer` and `.meta`);
    `speech` appends the spoken answer (for Step-Audio-style models)."""
    if isinstance(task, dict):
        k, emotion = task["answer"], task["emotion"]
    else:
        k, emotion = task.answer, task.meta["emotion"]
    return _reply(k, emotion, EMPATHY[emotion], speech)


def synth_clip(k: int, emotion: str, rng: np.random.Generator) -> np.ndarray:
    """k voiced syllables whose pitch/energy/tempo follow the emotion; float32 at 16 kHz."""
    p = PROSODY[emotion]
    speaker = rng.uniform(0.92, 1.08)  # per-speaker pitch scale
    level = p["level"] * rng.uniform(0.85, 1.15)
    syl_len = [p["syllable"] * rng.uniform(0.85, 1.15) for _ in range(k)]
    gaps = [p["gap"] * rng.uniform(0.8, 1.2) for _ in range(k - 1)]
    lead, tail = rng.uniform(0.04, 0.1), rng.uniform(0.04, 0.1)
    total = lead + sum(syl_len) + sum(gaps) + tail
    out = np.zeros(int(total * SAMPLE_RATE), dtype=np.float64)

    start = lead
    for i, dur in enumerate(syl_len):
        n = int(dur * SAMPLE_RATE)
        t = start + np.arange(n) / SAMPLE_RATE
        # Pitch contour over the whole utterance (rising/falling/flat) plus a slight vibrato.
        f0 = p["f0"] * speaker * (1 + p["slope"] * (t / total - 0.5))
        f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.0 * t + rng.uniform(0, 2 * np.pi))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        formants = VOWELS[rng.integers(len(VOWELS))]
        harmonics = np.arange(1, int(7000 / f0.min()) + 1)
        freqs = np.outer(harmonics, f0)  # [H, n]
        gain = sum(1.0 / (1.0 + ((freqs - f) / (60 + 0.06 * f)) ** 2) for f in formants)
        gain = gain / harmonics[:, None] * (freqs < 7500)
        voiced = (gain * np.sin(np.outer(harmonics, phase))).sum(axis=0)
        voiced /= np.sqrt(np.mean(voiced**2)) + 1e-12
        envelope = np.sin(np.pi * np.arange(n) / n) ** 0.6  # attack, sustain, decay
        s = int(start * SAMPLE_RATE)
        out[s : s + n] += level * envelope * voiced
        start += dur + (gaps[i] if i < len(gaps) else 0.0)

    out += 0.002 * rng.standard_normal(out.shape)  # room noise
    peak = np.abs(out).max()
    if peak > 0.98:
        out *= 0.98 / peak
    return out.astype(np.float32)


def _task_row(index: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, index])
    emotion = EMOTIONS[index % len(EMOTIONS)]
    k = int(rng.integers(1, 4))
    clip = synth_clip(k, emotion, rng)
    turn = dict(role="user", text=QUESTION, audio=encode_wav(clip), audio_path=None,
                sample_rate=SAMPLE_RATE, transcript=None)
    return dict(prompt_id=f"syn-{index:06d}", turns=[turn], answer=str(k), choices=list(CHOICES),
                emotion=emotion, num_syllables=k)


def _pair_row(i: int, task: dict, kind: str, rng: np.random.Generator, speech: bool = False) -> dict:
    k, emotion = int(task["answer"]), task["emotion"]
    if kind == "tone_deaf":
        others = [EMPATHY[e] for e in EMOTIONS if e != emotion]
        empathy = None if rng.random() < 0.34 else others[rng.integers(len(others))]
        rejected = _reply(k, emotion, empathy, speech)
    else:
        wrong = [c for c in range(1, 4) if c != k][rng.integers(2)]
        rejected = _reply(wrong, emotion, EMPATHY[emotion], speech)
    return dict(pair_id=f"synpair-{i:06d}", prompt_id=task["prompt_id"], turns=task["turns"],
                chosen=reference_reply(task, speech), rejected=rejected, kind=kind, emotion=emotion)


def generate_synthetic(out_dir, num_tasks: int, seed: int = 0,
                       num_pairs: int | None = None, speech_replies: bool = False) -> dict[str, Path]:
    """Write tasks.parquet and pairs.parquet (default 2 pairs per task: one of each kind).
    `speech_replies`: replies end with a `<tts_start>` speech span (Step-Audio-style models)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks}: expected at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [_task_row(i, seed) for i in range(num_tasks)]
    num_pairs = 2 * num_tasks if num_pairs is None else num_pairs
    rng = np.random.default_rng([seed, 1_000_003])
    pairs = [_pair_row(i, tasks[(i // 2) % num_tasks], PAIR_KINDS[i % 2], rng, speech_replies)
             for i in range(num_pairs)]
    paths = {"tasks": out / "tasks.parquet", "pairs": out / "pairs.parquet"}
    pq.write_table(pa.Table.from_pylist(tasks, schema=TASKS_SCHEMA), paths["tasks"])
    pq.write_table(pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA), paths["pairs"])
    return paths


DIALOGUES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("turns", pa.list_(TURN_TYPE)), ("answer", pa.string()),
    ("choices", pa.list_(pa.string())), ("turn_answers", pa.list_(pa.string())),
    ("turn_emotions", pa.list_(pa.string())), ("emotion", pa.string()),
])


def _dialogue_row(index: int, seed: int, num_turns: int) -> dict:
    """A user who asks `num_turns` times, each clip with its own count, the mood shifting;
    reference assistant replies sit between the user turns."""
    rng = np.random.default_rng([seed, 7_000_001, index])
    emotions, answers, turns = [], [], []
    emotion = EMOTIONS[index % len(EMOTIONS)]
    for t in range(num_turns):
        if t:
            emotion = [e for e in EMOTIONS if e != emotion][rng.integers(len(EMOTIONS) - 1)]
        k = int(rng.integers(1, 4))
        text = QUESTION if t == 0 else f"next : {QUESTION}"
        if t:  # the reference reply to the previous turn (replay puts the policy's in its place)
            turns.append(dict(role="assistant", text=_reply(answers[-1], emotions[-1], EMPATHY[emotions[-1]]),
                              audio=None, audio_path=None, sample_rate=None, transcript=None))
        turns.append(dict(role="user", text=text, audio=encode_wav(synth_clip(k, emotion, rng)),
                          audio_path=None, sample_rate=SAMPLE_RATE, transcript=None))
        emotions.append(emotion)
        answers.append(str(k))
    return dict(prompt_id=f"syndlg-{index:06d}", turns=turns, answer=answers[-1],
                choices=list(CHOICES), turn_answers=answers, turn_emotions=emotions,
                emotion=emotions[0])


def generate_synthetic_dialogues(out_dir, num_dialogues: int, num_turns: int = 3,
                                 seed: int = 0) -> Path:
    """The multi-turn variant: dialogues.parquet of `num_turns` spoken user turns per row
    (replayed in order by the `scripted` environment), one answer per turn."""
    if num_dialogues < 1 or num_turns < 1:
        raise ValueError(f"num_dialogues={num_dialogues}, num_turns={num_turns}: expected >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_dialogue_row(i, seed, num_turns) for i in range(num_dialogues)]
    path = out / "dialogues.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=DIALOGUES_SCHEMA), path)
    return path
