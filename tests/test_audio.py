"""Decoding, resampling and feature shapes of rlhf_cluster.audio on real encoded files."""

import numpy as np
import pytest
import soundfile as sf
import torch

from rlhf_cluster.audio import (AudioError, encode_wav, features_for_clips, load_audio, log_mel,
                                num_audio_tokens)


def _sine(freq, sr, seconds, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: torch.Tensor, sr=16000) -> float:
    spec = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.fft.rfftfreq(wave.numel(), 1 / sr)[spec.argmax()])


def test_stereo_44k_wav_becomes_16k_mono(tmp_path):
    sr, n = 44100, 44100  # 1 s
    left, right = _sine(440, sr, 1.0), _sine(440, sr, 1.0, amp=0.3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="PCM_16")
    wave = load_audio(path, where="test")
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() - n * 16000 / sr) <= 1
    assert abs(_peak_hz(wave) - 440) <= 2
    assert abs(wave.abs().max().item() - 0.4) < 0.02  # mean of the two channels


def test_8k_flac_bytes_become_16k(tmp_path):
    path = tmp_path / "mono.flac"
    sf.write(path, _sine(1000, 8000, 0.5), 8000, format="FLAC")
    for source in (path, str(path), path.read_bytes()):
        wave = load_audio(source, where="test")
        assert abs(wave.numel() - 8000) <= 1
        assert abs(_peak_hz(wave) - 1000) <= 3


def test_encode_wav_roundtrip():
    wave = torch.from_numpy(_sine(300, 16000, 0.25))
    back = load_audio(encode_wav(wave), where="test")
    assert back.numel() == wave.numel()
    assert torch.allclose(back, wave, atol=1e-4)


def test_errors_start_with_where_and_say_what_was_expected(tmp_path):
    where = "data/tasks.parquet row 17 field turns[0].audio"
    with pytest.raises(AudioError, match=r"^data/tasks\.parquet row 17 field turns\[0\]\.audio: .*does not exist"):
        load_audio(tmp_path / "nope.wav", where=where)
    with pytest.raises(AudioError, match=r"^data/tasks.* cannot decode .*expected WAV/FLAC"):
        load_audio(b"definitely not audio" * 10, where=where)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"", where=where)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(encode_wav(np.zeros(0, dtype=np.float32)), where=where)
    with pytest.raises(AudioError, match="declared sample_rate 16000"):
        load_audio(encode_wav(np.zeros(100, dtype=np.float32), 8000), where=where, sample_rate=16000)


def test_log_mel_shape_and_range():
    for n in (1, 150, 16000, 23456):
        mel = log_mel(torch.randn(n) * 0.1)
        assert mel.shape == (128, n // 160 + 1)
    mel = log_mel(torch.from_numpy(_sine(440, 16000, 1.0)))
    assert mel.max() - mel.min() <= 2.0 + 1e-6  # dynamic range clipped to 8 decades / 4


def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                 chunk_length=2)
    wave = torch.from_numpy(_sine(220, 16000, 1.0, amp=0.3)) + 0.05 * torch.randn(16000)
    ref = fe(wave.numpy(), sampling_rate=16000, return_tensors="pt")["input_features"][0]
    ours = log_mel(wave)
    assert torch.allclose(ours[:, :99], ref[:, :99], atol=1e-3)  # edge frames differ by padding


def test_num_audio_tokens():
    assert num_audio_tokens(100) == 25
    assert num_audio_tokens(200) == 50
    assert num_audio_tokens(101) == 25  # a = 51 -> (51 - 2)//2 + 1
    assert num_audio_tokens(103) == 26  # a = 52 -> (52 - 2)//2 + 1
    assert num_audio_tokens(3000) == 750  # full 30 s Whisper window in Qwen2-Audio
    assert num_audio_tokens(3) == 1
    assert num_audio_tokens(1) == 0  # clips under ~20 ms yield no audio token at all


def test_features_for_clips_pads_truncates_and_masks():
    short, long = torch.randn(8000) * 0.1, torch.randn(48000) * 0.1  # 0.5 s, 3 s
    feats, mask = features_for_clips([short, long], max_frames=200)
    assert feats.shape == (2, 128, 200) and feats.dtype == torch.float32
    assert mask.shape == (2, 200) and mask.dtype == torch.long
    assert mask[0].sum() == 51 and mask[1].sum() == 200
    assert torch.equal(feats[0, :, :51], log_mel(short))
    assert (feats[0, :, 51:] == 0).all()
    assert torch.equal(feats[1], log_mel(long)[:, :200])
    empty_f, empty_m = features_for_clips([])
    assert empty_f.shape == (0, 128, 200) and empty_m.shape == (0, 200)
