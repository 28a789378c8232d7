"""Multi-turn rollouts: exact ids and masks over every assistant turn, reasoning stripped from
later contexts, audio paired per row, turn-aware verifiers, dialogue datasets."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from actors.dialogue import DialogueLimits, DialogueRunner
from actors.engine import GenerationResult, SamplingParams
from actors.rollout_worker import RolloutWorker
from learners.losses import token_logprobs
from reward_services.verifier_service import VerifierService
from rlhf_cluster.data.synthetic import generate_synthetic_dialogues
from rlhf_cluster.data.tasks import DatasetError, load_tasks
from rlhf_cluster.experience import collate
from rlhf_cluster.models import load_model

SYSTEM = "you are a caring voice assistant ."
SIMULATED = {"env": "simulated_user", "max_turns": 3, "max_total_tokens": 1024}
SAMPLING = {"n": 2, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0}


class Recorder:
    """Wraps the real engine and keeps every request and result (to compare byte for byte)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, requests):
        results = self.engine.generate(requests)
        self.calls.append((requests, results))
        return results


@pytest.fixture(scope="module")
def step_model_dir(tmp_path_factory):
    from rlhf_cluster.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("step") / "model", seed=1, family="step_audio"))


@pytest.fixture(scope="module")
def tasks(synthetic_dir):
    return load_tasks(synthetic_dir / "tasks.parquet").tasks[:3]


def _recorded_rollout(model_dir, tasks, dialogue, step=1):
    worker = RolloutWorker(0, model_dir, system_prompt=SYSTEM, dialogue=dialogue)
    rec = Recorder(worker.engine)
    worker.dialogue.engine = rec
    return worker, rec, worker.rollout(tasks, SAMPLING, step=step)


def _turns_of(rec, episode):
    """(prompt ids the engine was given, result) for each turn of one episode, in order: turn 1
    is the prompt's request (sample i of n), later turns the dialogue's own request. Request
    ids are "<position in the run>:<prompt id>[\x1f<sample>]"; the prompts here are distinct."""
    mine = {episode.prompt_id: episode.sample_index, f"{episode.prompt_id}\x1f{episode.sample_index}": 0}
    out = []
    for requests, results in rec.calls:
        by_id = {r.request_id: r for r in requests}
        out += [(by_id[res.request_id].prompt_ids, res) for res in results
                if mine.get(res.request_id.split(":", 1)[1]) == res.sample_index]
    return out


def test_masks_ids_and_logprobs_are_exactly_the_sampled_turns(step_model_dir, tasks):
    worker, rec, episodes = _recorded_rollout(step_model_dir, tasks, {**SIMULATED, "keep_reasoning": True})
    assert len(episodes) == len(tasks) * SAMPLING["n"]
    batch = collate(episodes, worker.pad_token_id())
    assert batch.input_ids.shape[0] == len(episodes)  # reasoning kept: one row per dialogue
    for b, ep in enumerate(episodes):
        turns = _turns_of(rec, ep)
        assert len(turns) == len(ep.turn_spans) == len(ep.turn_versions) == len(ep.env_turn_rewards) == 3
        masked = set()
        for (prompt, res), (start, end) in zip(turns, ep.turn_spans):
            assert ep.token_ids[:start] == prompt  # every turn's context is a prefix of the record
            assert ep.token_ids[start:end] == res.token_ids
            assert ep.logprobs[start:end] == res.logprobs
            masked |= set(range(start, end))
        assert [i for i, m in enumerate(ep.loss_mask) if m] == sorted(masked)
        row = batch.loss_mask[b].bool()
        assert batch.input_ids[b][row].tolist() == [t for p, r in turns for t in r.token_ids]
        assert batch.input_ids[b, :len(ep.token_ids)].tolist() == ep.token_ids
        assert batch.old_logprobs[b][row].tolist() == pytest.approx([x for _, r in turns for x in r.logprobs])
        assert ep.policy_version == min(ep.turn_versions)
        assert ep.response_text == ep.turn_texts[-1]
        assert [d["role"] for d in ep.dialogue] == ["user", "assistant"] * 3
        assert len(ep.task["turn_answers"]) == len(ep.task["turn_emotions"]) == 3
        emotions = ep.task["turn_emotions"]
        assert all(a != b for a, b in zip(emotions, emotions[1:]))  # the user's mood shifts
        assert ep.turn_clips == [1, 2, 3] and ep.audio["input_features"].shape[0] == 3
        # no audio placeholder, header or user token is ever in the mask
        placeholder = {worker.adapter.audio_token, worker.adapter.audio_bos, worker.adapter.im_start}
        assert not placeholder & set(batch.input_ids[b][row].tolist())


class ScriptedEngine:
    """Pure-logic stand-in that replies with fixed ids (reasoning + text + speech), so the
    reasoning-stripping bookkeeping can be checked against hand-built sequences."""

    weight_version = 7

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, requests):
        self.calls.append(requests)
        turn = len(self.calls) - 1
        return [GenerationResult(r.request_id, i, list(self.replies[turn]), [-0.5 - turn] * len(self.replies[turn]),
                                 "stop", self.weight_version)
                for r in requests for i in range(r.sampling.n)]


def _ids(adapter, text):
    return adapter.tokenizer.convert_tokens_to_ids(text.split())


@pytest.mark.parametrize("keep", [False, True])
def test_earlier_reasoning_is_stripped_and_rows_are_exact_engine_contexts(step_model_dir, tasks, keep):
    worker = RolloutWorker(0, step_model_dir, system_prompt=SYSTEM)
    a = worker.adapter
    replies = [_ids(a, f"<think> i count {k} </think> the answer is {k} <tts_start> <audio_{k}> <tts_end> <|im_end|>")
               for k in (1, 2, 3)]
    engine = ScriptedEngine(replies)
    runner = DialogueRunner(engine, a, SYSTEM, {"env": "simulated_user"},
                            DialogueLimits(max_turns=3, keep_reasoning=keep))
    params = SamplingParams(n=2, max_new_tokens=16, stop_token_ids=a.stop_token_ids)
    episodes = runner.run(tasks[:2], params, step=3)
    ep = episodes[0]
    think = a.think
    for k, requests in enumerate(engine.calls):
        prompt = requests[0].prompt_ids
        earlier_think = prompt.count(think)
        assert earlier_think == (k if keep else 0)  # only the kept reasoning reaches the engine
    rows = ep.training_rows()
    assert len(rows) == (1 if keep else 3)
    batch = collate(episodes, worker.pad_token_id())
    assert batch.input_ids.shape[0] == len(episodes) * len(rows)
    if not keep:
        assert ep.context_drops == [(s, s + 5) for s, _ in ep.turn_spans[:2]]  # "<think> i count k </think>"
        for k, (ids, mask, logprobs, clips) in enumerate(rows):
            engine_prompt = next(r.prompt_ids for r in engine.calls[k]  # turn 1: one request per prompt
                                 if r.request_id.split(":", 1)[1] in (ep.prompt_id, f"{ep.prompt_id}\x1f0"))
            assert ids == engine_prompt + replies[k]  # byte for byte what the engine saw + sampled
            assert [t for t, m in zip(ids, mask) if m] == replies[k]
            assert [x for x, m in zip(logprobs, mask) if m] == [-0.5 - k] * len(replies[k])
            assert clips == k + 1
            assert batch.input_ids[k, :len(ids)].tolist() == ids
            assert batch.loss_mask[k, :len(ids)].tolist() == mask
        assert batch.model_inputs["clips_per_row"].tolist() == [1, 2, 3] * len(episodes)
    spans = a.split_output(replies[0])
    assert spans == {"reasoning": [(0, 5)], "text": [(5, 9), (12, 13)], "speech": [(9, 12)]}
    score = VerifierService(["correct", "speech_span"]).score([{
        "episode_id": ep.episode_id, "response": ep.response_text, "task": ep.task,
        "turn_texts": ep.turn_texts}])[0]
    right = [float(ans == str(k)) for ans, k in zip(ep.task["turn_answers"], (1, 2, 3))]
    assert score["__turns__"] == [{"correct": r, "speech_span": 1.0} for r in right]
    assert score["correct"] == pytest.approx(sum(right) / 3) and score["speech_span"] == 1.0
    assert ep.env_turn_rewards == right  # the simulated user's own check agrees


def test_audio_stays_paired_with_each_row_for_several_prompts_times_n(tiny_model_dir, tasks):
    """3 prompts x 2 samples x 3 turns, reasoning stripped (one row per turn): recomputing the
    logprobs from the collated batch reproduces the engine's behaviour logprobs, which only
    happens if every row gets exactly the clips its context was sampled with."""
    worker, _, episodes = _recorded_rollout(tiny_model_dir, tasks, SIMULATED, step=2)
    for ep in episodes:  # force per-turn rows even if the random policy wrote no <think>
        ep.context_drops = ep.context_drops or [(ep.turn_spans[0][0], ep.turn_spans[0][0])]
    batch = collate(episodes, worker.pad_token_id())
    rows = [r for ep in episodes for r in ep.training_rows()]
    assert batch.model_inputs["clips_per_row"].tolist() == [r[3] for r in rows] == [1, 2, 3] * len(episodes)
    model = load_model(tiny_model_dir).eval()
    suppress = torch.tensor(worker.adapter.suppress_token_ids)
    inputs = {k: v for k, v in batch.model_inputs.items() if k != "clips_per_row"}
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **inputs).logits
        got = token_logprobs(logits.index_fill(-1, suppress, float("-inf")), batch.input_ids)
    mask = batch.loss_mask.bool()
    assert torch.allclose(got[mask], batch.old_logprobs[mask], atol=1e-4)
    # each row carries its context's clips (row 2 of a dialogue repeats row 1's clip first)...
    feats, per_episode = inputs["input_features"], 1 + 2 + 3
    assert torch.equal(feats[0], feats[1]) and not torch.equal(feats[0], feats[2])
    # ...and handing rows another prompt's clips is detected by the same check
    shuffled = {**inputs, "input_features": feats.roll(per_episode * SAMPLING["n"], dims=0)}
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **shuffled).logits
        wrong = token_logprobs(logits.index_fill(-1, suppress, float("-inf")), batch.input_ids)
    assert not torch.allclose(wrong[mask], batch.old_logprobs[mask], atol=1e-4)


def test_scripted_replay_of_a_multi_turn_dataset(tmp_path, tiny_model_dir):
    path = generate_synthetic_dialogues(tmp_path, num_dialogues=2, num_turns=3, seed=0)
    dialogues = load_tasks(path).tasks
    assert [[t.role for t in d.turns] for d in dialogues] == [["user", "assistant"] * 2 + ["user"]] * 2
    assert len(dialogues[0].meta["turn_answers"]) == 3
    worker = RolloutWorker(0, tiny_model_dir, system_prompt=SYSTEM,
                           dialogue={"env": "scripted", "max_turns": 8, "max_total_tokens": 1024})
    episodes = worker.rollout(dialogues, SAMPLING, step=1)
    for ep in episodes:
        assert len(ep.turn_spans) == 3 and ep.turn_clips == [1, 2, 3]
        source = next(d for d in dialogues if d.prompt_id == ep.prompt_id)
        assert ep.dialogue[0::2] == [{"role": "user", "text": t.text} for t in source.turns if t.role == "user"]
        assert ep.turn_texts != [t.text for t in source.turns if t.role == "assistant"][:3]  # the policy's own
    tight = RolloutWorker(0, tiny_model_dir, system_prompt=SYSTEM,
                          dialogue={"env": "scripted", "max_turns": 8, "max_total_tokens": 80})
    short = tight.rollout(dialogues[:1], SAMPLING, step=1)
    assert all(len(ep.turn_spans) < 3 and len(ep.token_ids) <= 80 for ep in short)
    score = VerifierService(["correct"]).score([{"episode_id": "x", "response": "",
                                                 "task": short[0].task, "turn_texts": short[0].turn_texts}])[0]
    assert len(score["__turns__"]) == 3 and score["__turns__"][-1] == {"correct": 0.0}  # unreached turn


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_dialogue_rows_load_any_rate_and_name_bad_rows(tmp_path):
    t = np.arange(44100) / 44100
    sf.write(tmp_path / "stereo44k.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.3, 44100)
    sf.write(tmp_path / "mono8k.wav", np.sin(2 * np.pi * 300 * np.arange(4000) / 8000) * 0.3, 8000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + b"\0" * 40)
    good = {"prompt_id": "d0", "turns": [
        {"role": "user", "audio_path": "stereo44k.wav", "sample_rate": 44100, "text": "how many syllables did i say ?"},
        {"role": "assistant", "text": "the answer is 2"},
        {"role": "user", "audio": "mono8k.wav", "transcript": "next"}],
        "turn_answers": ["2", "1"], "choices": ["1", "2", "3"], "rubric": ["warm tone"],
        "labels": {"emotion": "happy"}}
    path = _jsonl(tmp_path / "dialogues.jsonl", [
        good,
        {**good, "prompt_id": "d1", "turns": good["turns"][:2] + [{"role": "user", "audio_path": "gone.wav"}]},
        {**good, "prompt_id": "d2", "turns": good["turns"][:2] + [{"role": "user", "audio_path": "corrupt.wav"}]},
        {**good, "prompt_id": "d3", "turns": []},
        {**good, "prompt_id": "d4", "turn_answers": ["2"]},
        {**good, "prompt_id": "d5", "turns": [{"role": "assistant", "text": "hello"}]},
    ])
    loaded = load_tasks(path, on_bad_row="skip")
    assert [x.prompt_id for x in loaded] == ["d0"] and len(loaded.skipped) == 5
    clips = [turn.audio for turn in loaded[0].turns if turn.audio is not None]
    assert [c.dim() for c in clips] == [1, 1] and [c.numel() for c in clips] == [16000, 8000]
    assert abs(float(clips[0].pow(2).mean().sqrt()) - 0.3 / np.sqrt(2)) < 0.01  # stereo averaged, not summed
    assert loaded[0].meta["rubric"] == ["warm tone"] and loaded[0].meta["labels"] == {"emotion": "happy"}
    expected = ["row 1 (line 2) field turns[2].audio_path: audio file", "row 2 (line 3) field turns[2].audio_path: cannot decode",
                "row 3 (line 4) field turns: expected", "row 4 (line 5) field turn_answers: expected 2 answer(s)",
                "row 5 (line 6) field turns: expected at least one user turn"]
    for msg, want in zip(loaded.skipped, expected):
        assert want in msg, msg
    with pytest.raises(DatasetError, match=r"row 1 \(line 2\) field turns\[2\]\.audio_path: .*gone\.wav.*does not exist"):
        load_tasks(path)


@pytest.mark.parametrize("reply, expected", [
    ("<think> x </think> the answer is 2 <tts_start> <audio_3> <audio_9> <tts_end>", 1.0),
    ("<think> x </think> the answer is 2", 0.0),  # no speech
    ("<think> <tts_start> <audio_3> <tts_end> </think> the answer is 2", 0.0),  # speech only in reasoning
    ("the answer is 2 <tts_start> <tts_end>", 0.0),  # empty span
    ("the answer is 2 <tts_start> <audio_3> two <tts_end>", 0.0),  # text inside the span
    ("the answer is 2 <tts_start> <audio_3> <tts_end> <tts_start> <audio_4> <tts_end>", 0.0),  # two spans
    ("the answer is 2 <tts_start> <audio_3> <audio_4> <audio_5> <tts_end>", 0.0),  # longer than max 2
])
def test_speech_span_verifier(reply, expected):
    from reward_services.verifiers import VERIFIERS

    assert VERIFIERS["speech_span"](reply, {"max_speech_tokens": 2}) == expected


def test_turn_aware_verifier_service_hand_computed():
    service = VerifierService(["correct", "reasoning_present"])
    item = {"episode_id": "e", "response": "<think> b </think> the answer is 3",
            "task": {"answer": "3", "choices": ["1", "2", "3"], "turn_answers": ["1", "2", "3"]},
            "turn_texts": ["<think> a </think> the answer is 1", "the answer is 3",
                           "<think> b </think> the answer is 3"]}
    out = service.score([item, {**item, "task": {**item["task"], "turn_answers": []}},
                         {k: v for k, v in item.items() if k != "turn_texts"} | {"task": {"answer": "3", "choices": None}}])
    assert out[0]["__turns__"] == [{"correct": 1.0, "reasoning_present": 1.0}, {"correct": 0.0, "reasoning_present": 0.0},
                                   {"correct": 1.0, "reasoning_present": 1.0}]
    assert out[0]["correct"] == pytest.approx(2 / 3) and out[0]["reasoning_present"] == pytest.approx(2 / 3)
    assert "turn_answers is empty" in out[1]["__error__"]
    assert out[2] == {"correct": 1.0, "reasoning_present": 1.0}  # single-turn: unchanged, no __turns__


def test_causal_lm_adapter_runs_text_only_dialogues(tmp_path, synthetic_dir):
    """Any plain HF causal LM (text only): ChatML adapter, text turns, no audio inputs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_cluster.adapters import ChatAdapter, make_adapter
    from rlhf_cluster.data.tasks import Task, Turn
    from rlhf_cluster.tiny_model import build_tokenizer

    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, eos_token_id=ids("<|im_end|>"),
                      pad_token_id=ids("<|pad|>"))
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    adapter = make_adapter("auto", str(tmp_path), tok)
    assert type(adapter) is ChatAdapter and adapter.audio_inputs([]) is None
    task = Task("t0", [Turn("user", "how many syllables did i say ?")], answer="2", choices=None,
                meta={"emotion": "calm"})
    worker = RolloutWorker(0, str(tmp_path), system_prompt=SYSTEM,
                           dialogue={"env": "scripted", "max_turns": 2})
    episodes = worker.rollout([task], SAMPLING, step=1)
    assert len(episodes) == 2 and all(e.audio is None and len(e.turn_spans) == 1 for e in episodes)
    with pytest.raises(ValueError, match="no audio input"):
        adapter.render_turn(Turn("user", "", audio=torch.zeros(1600)))


@pytest.mark.parametrize("override, message", [
    ("dialogue.env=chatbot", r"dialogue.env='chatbot' is not allowed"),
    ("dialogue.max_turns=0", r"dialogue.max_turns=0 must be > 0"),
    ("dialogue.env=single_turn", r"dialogue.max_turns=3 with dialogue.env=single_turn"),
    ("dialogue.max_total_tokens=16", r"dialogue.max_total_tokens=16 must exceed rollout.max_new_tokens=32"),
    ("model.tiny_family=gpt", r"model.tiny_family='gpt' is not allowed"),
])
def test_dialogue_config_is_validated(override, message):
    from rlhf_cluster.config import ConfigError, load_config

    cfg = load_config("configs/quickstart_dialogue.yaml")
    assert cfg.dialogue.env == "simulated_user" and cfg.dialogue.max_turns >= 3
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart_dialogue.yaml", [override])
