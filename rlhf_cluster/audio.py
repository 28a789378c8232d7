"""Audio in, features out: decoding, resampling and Whisper-style log-mel features.

Everything downstream (datasets, rollout engines, learners) sees one canonical form: a float32
mono 1-D tensor at 16 kHz. Decoding goes through `soundfile` (WAV/FLAC/OGG...), because
torchaudio's own I/O needs torchcodec, which this project does not depend on. Features are plain
`torch.stft` + a Slaney filterbank, so rollout processes (e.g. the vLLM environment, whose
torchaudio cannot load) need torchaudio only to resample clips that are not 16 kHz.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from rlhf_cluster.tiny_model import AUDIO_MAX_FRAMES

SAMPLE_RATE = 16000
N_FFT, HOP_LENGTH, N_MELS = 400, 160, 128


class AudioError(ValueError):
    """A clip that cannot be used; the message starts with where it came from."""


def load_audio(source, *, where: str, sample_rate: int | None = None) -> torch.Tensor:
    """Decode a file path or encoded bytes (WAV/FLAC/...) to float32 mono at 16 kHz.

    `where` prefixes every error message (e.g. "tasks.parquet row 3 field turns[0].audio") so a
    bad clip is traceable to its dataset row. `sample_rate`, when given, is the rate the dataset
    declares for the clip; a header that disagrees is an error rather than a silent guess.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError(f"{where}: audio bytes are empty; expected an encoded WAV/FLAC clip")
        what, handle = f"{len(data)} audio bytes", io.BytesIO(data)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{where}: audio file {str(path)!r} does not exist; "
                             "expected a readable WAV/FLAC file")
        what, handle = f"audio file {str(path)!r}", path
    else:
        raise AudioError(f"{where}: got {type(source).__name__}; expected a file path or "
                         "encoded WAV/FLAC bytes")
    try:
        samples, file_rate = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"{where}: cannot decode {what} ({exc}); "
                         "expected WAV/FLAC audio") from None
    if sample_rate is not None and int(sample_rate) != int(file_rate):
        raise AudioError(f"{where}: declared sample_rate {sample_rate} but {what} is "
                         f"{file_rate} Hz; expected them to agree")
    if samples.shape[0] == 0:
        raise AudioError(f"{where}: {what} contains no samples; expected non-empty audio")
    if not np.isfinite(samples).all():
        raise AudioError(f"{where}: {what} contains NaN/inf samples; expected finite audio")
    wave = torch.from_numpy(samples).mean(dim=1)  # [time, channels] -> mono
    if file_rate != SAMPLE_RATE:
        import torchaudio

        wave = torchaudio.functional.resample(wave, int(file_rate), SAMPLE_RATE)
    return wave.to(torch.float32).contiguous()


def encode_wav(wave, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV bytes (what datasets store and generators emit)."""
    array = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    buf = io.BytesIO()
    sf.write(buf, np.asarray(array, dtype=np.float32), int(sample_rate), format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


_MEL_FILTERS: torch.Tensor | None = None


def _mel_filters() -> torch.Tensor:
    """Whisper's filterbank [n_fft // 2 + 1, 128] (Slaney scale and norm), built once per process."""
    global _MEL_FILTERS
    if _MEL_FILTERS is None:
        from transformers.audio_utils import mel_filter_bank

        _MEL_FILTERS = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
            mel_scale="slaney")).to(torch.float32)
    return _MEL_FILTERS


def _mel_power(wave: torch.Tensor) -> torch.Tensor:
    """Power mel spectrogram [128, len // 160 + 1]: centred, reflect-padded Hann STFT."""
    spec = torch.stft(wave, n_fft=N_FFT, hop_length=HOP_LENGTH, window=torch.hann_window(N_FFT),
                      center=True, pad_mode="reflect", return_complex=True).abs().pow(2)
    return _mel_filters().T @ spec


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Whisper-style log-mel [128, len // 160 + 1] of a 16 kHz mono wave."""
    wave = wave.detach().to(torch.float32).reshape(-1).cpu()
    if wave.numel() == 0:
        raise ValueError("log_mel: empty wave; expected at least one sample")
    frames = wave.numel() // HOP_LENGTH + 1
    if wave.numel() <= N_FFT // 2:  # reflect padding needs more samples than the pad
        wave = torch.nn.functional.pad(wave, (0, N_FFT // 2 + 1 - wave.numel()))
    mel = _mel_power(wave)[:, :frames]
    x = torch.log10(mel.clamp(min=1e-10))
    x = torch.maximum(x, x.max() - 8.0)
    return (x + 4.0) / 4.0


def features_for_clips(waves: list[torch.Tensor], max_frames: int = AUDIO_MAX_FRAMES
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch clips to fixed-size encoder input: features [N, 128, max_frames] (zero-padded or
    truncated) and feature_attention_mask [N, max_frames] (1 on real frames)."""
    feats = torch.zeros(len(waves), N_MELS, max_frames, dtype=torch.float32)
    mask = torch.zeros(len(waves), max_frames, dtype=torch.long)
    for i, wave in enumerate(waves):
        mel = log_mel(wave)[:, :max_frames]
        feats[i, :, : mel.shape[1]] = mel
        mask[i, : mel.shape[1]] = 1
    return feats, mask


def num_audio_tokens(valid_frames: int) -> int:
    """Qwen2-Audio encoder output length (conv stride 2, then avg-pool stride 2): the number of
    <|AUDIO|> placeholders a clip with `valid_frames` mel frames needs."""
    a = (int(valid_frames) - 1) // 2 + 1
    return (a - 2) // 2 + 1
