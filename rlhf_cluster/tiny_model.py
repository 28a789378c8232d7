"""Build the tiny offline audio LM used by the quickstart, the tests and CI.

It is a real `Qwen2AudioForConditionalGeneration` (random init, tiny dims) plus a word-level
tokenizer carrying the chat / think / audio / speech-token markers, saved as an ordinary
Hugging Face directory (safetensors + tokenizer.json + processor files). Everything downstream
loads it through the same path as a real checkpoint (`rlhf_cluster.models.load_model`).
Dimensions respect vLLM's CPU kernels (head_dim 64).
"""

from __future__ import annotations

from pathlib import Path

import torch

PAD, EOS = "<|pad|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
THINK, END_THINK = "<think>", "</think>"
TTS_START, TTS_END = "<tts_start>", "<tts_end>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK, IM_START, IM_END, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS,
                  THINK, END_THINK, TTS_START, TTS_END]
NUM_SPEECH_TOKENS = 64  # discrete speech-token range <audio_0>..<audio_63> (Step-Audio style)
SPEECH_TOKENS = [f"<audio_{i}>" for i in range(NUM_SPEECH_TOKENS)]

# Every word the built-in tasks, their replies and the simulated user may use.
WORDS = """
system user assistant you are a caring voice assistant . , ? ! :
how many syllables did i say count hear heard the answer is it was
voice sounds tone feel feels seem seems happy sad angry calm excited upset
great wonderful sorry that hard okay understand relax sure glad hear so
0 1 2 3 4 5 6 7 8 9 a b c d one two three four five
what which option letter yes no and but because then now again please tell me
again next turn still more less thank thanks hello
""".split()

# Mel window: 2 s of 16 kHz audio at hop 160 -> 200 frames -> max_source_positions 100.
AUDIO_MAX_FRAMES = 200


def build_tokenizer():
    """Word-level fast tokenizer: whitespace-split words, special tokens split anywhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + SPEECH_TOKENS + list(dict.fromkeys(WORDS)):
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, eos_token=IM_END, unk_token=UNK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, IM_END, UNK)],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:] + SPEECH_TOKENS},
                                 replace_extra_special_tokens=False)
    return tokenizer


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 128,
                     num_layers: int = 2, family: str = "qwen2_audio") -> Path:
    """Write a tiny Qwen2-Audio model directory; returns its path.

    `family="step_audio"` records the contiguous speech-token range (`<audio_0>`..`<audio_63>`)
    as `speech_token_range` in config.json, which makes the adapter treat the model as
    Step-Audio-2-style (replies may carry `<tts_start>` speech spans `<tts_end>`)."""
    if family not in ("qwen2_audio", "step_audio"):
        raise ValueError(f"family={family!r}: expected 'qwen2_audio' or 'step_audio'")
    from transformers import (GenerationConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, WhisperFeatureExtractor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=2,
            encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64,
            max_source_positions=AUDIO_MAX_FRAMES // 2,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size,
            intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
            max_position_embeddings=1024, tie_word_embeddings=False,
            bos_token_id=ids(IM_START), eos_token_id=ids(IM_END), pad_token_id=ids(PAD),
        ),
        audio_token_id=ids(AUDIO_TOKEN),
    )
    config.pad_token_id = ids(PAD)
    if family == "step_audio":
        first = ids(SPEECH_TOKENS[0])
        assert ids(SPEECH_TOKENS[-1]) == first + NUM_SPEECH_TOKENS - 1  # contiguous range
        config.speech_token_range = [first, first + NUM_SPEECH_TOKENS]
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids(IM_END), pad_token_id=ids(PAD), bos_token_id=ids(IM_START))
    model.save_pretrained(out, safe_serialization=True)
    # Re-write the weights under the Hub's Qwen2-Audio names, which both transformers and vLLM
    # load (save_pretrained's reverse renaming doubles `model.` in the language model's names).
    from safetensors.torch import save_file

    from rlhf_cluster.checkpoint_names import checkpoint_name

    save_file({checkpoint_name("qwen2_audio", k): v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
        chunk_length=AUDIO_MAX_FRAMES * 160 // 16000)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                    chat_template=None)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
