"""ChatML adapter: the shared base of every family, and the adapter for any plain causal LM.

The adapter tokenizes each *text* segment on its own and splices placeholder ids for audio, so
prompts are built from ids, never by re-tokenizing generated text. A conversation is rendered
turn by turn (`render_turn`), so a multi-turn rollout can append the next user turn to the
exact ids the engine already saw.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_cluster.tiny_model import END_THINK, IM_END, IM_START, THINK


def marked_spans(token_ids: list[int], open_id: int, close_id: int) -> list[tuple[int, int]]:
    """[start, end) of every `open ... close` block, markers included; an unclosed block runs
    to the end (a reply cut by the length limit)."""
    spans, i = [], 0
    while i < len(token_ids):
        if token_ids[i] == open_id:
            end = next((j + 1 for j in range(i + 1, len(token_ids)) if token_ids[j] == close_id),
                       len(token_ids))
            spans.append((i, end))
            i = end
        else:
            i += 1
    return spans


class ChatAdapter:
    """ChatML rendering (`<|im_start|>role ... <|im_end|>`), shared by Qwen2-Audio and most LMs.

    The interface every family implements: `render_prompt` / `render_turn` /
    `assistant_header` / `close_assistant` (conversation -> ids), `audio_inputs` (clips ->
    model features), `split_output` (sampled ids -> reasoning / text / speech spans) and
    `weight_names` (HF parameter names -> the names the rollout engine loads)."""

    supports_audio = False

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids(IM_START)
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.im_end
        self.stop_token_ids = sorted({self.im_end, tokenizer.eos_token_id} - {None})
        self.suppress_token_ids = sorted({self.im_start, self.pad_id} - set(self.stop_token_ids))
        self.think, self.end_think = self._special_id(THINK), self._special_id(END_THINK)

    def _special_id(self, token: str) -> int | None:
        """The id of a marker token, or None when the vocabulary lacks it (maps to <unk>)."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.tokenizer.unk_token_id else tid

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def render_prompt(self, system: str | None, turns: list) -> tuple[list[int], list[torch.Tensor]]:
        """Token ids for system + turns + the assistant header, and the audio clips in order."""
        ids: list[int] = []
        clips: list[torch.Tensor] = []
        if system:
            ids += [self.im_start] + self.text_ids(f"system\n{system}") + [self.im_end] + self.text_ids("\n")
        for turn in turns:
            turn_ids, turn_clips = self.render_turn(turn)
            ids += turn_ids
            clips += turn_clips
        ids += self.assistant_header()
        return ids, clips

    def render_turn(self, turn) -> tuple[list[int], list[torch.Tensor]]:
        """One complete turn (`role`, `text`, optional `audio`) as ids, plus its clips."""
        ids = [self.im_start] + self.text_ids(f"{turn.role}\n")
        clips = []
        if turn.audio is not None:
            if not self.supports_audio:
                raise ValueError("this model adapter has no audio input; use an audio LM")
            ids += self.audio_placeholder(turn.audio)
            clips.append(turn.audio)
        if turn.text:
            ids += self.text_ids(turn.text)
        return ids + [self.im_end] + self.text_ids("\n"), clips

    def assistant_header(self) -> list[int]:
        return [self.im_start] + self.text_ids("assistant\n")

    def close_assistant(self, reply_ids: list[int]) -> list[int]:
        """Ids that end an assistant turn in the context (the end token when the reply was cut
        by the length limit, then the newline); never sampled, so never trained on."""
        return ([] if reply_ids and reply_ids[-1] in self.stop_token_ids else [self.im_end]) \
            + self.text_ids("\n")

    def audio_placeholder(self, wave: torch.Tensor) -> list[int]:
        raise NotImplementedError

    def audio_inputs(self, clips: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return None

    def split_output(self, token_ids: list[int]) -> dict[str, list[tuple[int, int]]]:
        """[start, end) spans of sampled ids: `reasoning` (a `<think>...</think>` block, markers
        included; an unterminated one runs to the end), `speech` (speech-token spans, none for
        text-only families) and `text` (everything else)."""
        reasoning = (marked_spans(token_ids, self.think, self.end_think)
                     if self.think is not None and self.end_think is not None else [])
        speech = self._speech_spans(token_ids)
        taken = sorted(reasoning + speech)
        text, pos = [], 0
        for s, e in taken:
            if s > pos:
                text.append((pos, s))
            pos = max(pos, e)
        if pos < len(token_ids):
            text.append((pos, len(token_ids)))
        return {"reasoning": reasoning, "text": text, "speech": speech}

    def _speech_spans(self, token_ids: list[int]) -> list[tuple[int, int]]:
        return []

    def weight_names(self, names: list[str]) -> dict[str, str]:
        """HF parameter name -> the name the rollout engine loads (identity for HF layouts)."""
        return {n: n for n in names}

    def decode(self, token_ids: list[int]) -> str:
        """Reply text for reward services; stop and pad tokens removed, markers like <think> kept."""
        ids = [t for t in token_ids if t not in self.stop_token_ids and t != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()
