"""Audio for speech models: read any file as 16 kHz mono, and Whisper's log-mel features.

`read_audio` decodes with soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...), averages the
channels and resamples with soxr. `log_mel` is Whisper's input: an 80-band (or 128)
log-mel spectrogram of a fixed window, the same numbers as Hugging Face's
`WhisperFeatureExtractor` (checked in tests/test_audio.py against stored outputs):
25 ms periodic-Hann frames every 10 ms (n_fft 400, hop 160, centred with reflect
padding), the power spectrum through Slaney-normalised triangular filters on the
Slaney mel scale from 0 to 8 kHz, log10 floored at 1e-10, then at 8 below the
window's maximum, and scaled as (x + 4) / 4.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np

from ftjax.errors import UserError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 100
MAX_SECONDS = 30.0

AudioInput = str | os.PathLike | bytes
# Decoded float32 bytes a file may declare: FLAC/Vorbis of silence compress ~1000x; a floor for short files.
_MAX_DECODED, _MAX_INFLATION = 256 << 20, 64


def _name(source: AudioInput, name: str | None) -> str:
    if name:
        return name
    return "audio bytes" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """float32 mono at SAMPLE_RATE from samples [n] or [n, channels] at `rate`.

    Args:
      samples: float samples in [-1, 1], or integers holding 16-bit PCM values (ftjax's
        builders store int16; TFDS Audio features hold them in int16 or int64).
      rate: their sample rate (Hz).

    Returns:
      float32 [m], m = round(n * 16000 / rate).
    """
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 32768.0
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if int(rate) != SAMPLE_RATE and x.size:
        import soxr

        x = soxr.resample(x, int(rate), SAMPLE_RATE)
    return np.ascontiguousarray(x, np.float32)


def read_audio(source: AudioInput, *, max_seconds: float | None = MAX_SECONDS,
               name: str | None = None) -> np.ndarray:
    """Decodes an audio file (or its bytes) to float32 mono at 16 kHz.

    Args:
      source: a path, or the encoded file's bytes.
      max_seconds: longer audio is an error; None: no limit.
      name: how messages name the audio (default: the path).

    Returns:
      float32 [n] in [-1, 1], n > 0.

    Raises:
      UserError: missing, unreadable or empty audio, or longer than `max_seconds`
        (one line naming the file).
    """
    import soundfile as sf

    label = _name(source, name)
    label = label if label.isprintable() else repr(label)  # a manifest's cell may hold a newline
    if not isinstance(source, (bytes, bytearray)) and not os.path.isfile(source):
        raise UserError(f"audio file {label} does not exist")
    size = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
    try:
        with sf.SoundFile(_Bytes(source) if isinstance(source, (bytes, bytearray)) else source) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
            if rate <= 0 or channels <= 0:
                raise UserError(f"audio {label} declares {rate} Hz and {channels} channels; the file is damaged")
            seconds = frames / rate
            if max_seconds is not None and seconds > max_seconds:  # from the header, before decoding
                raise UserError(f"audio {label} is {seconds:.1f} s long, over the {max_seconds:g} s limit")
            if frames * channels * 4 > max(_MAX_DECODED, _MAX_INFLATION * size):
                raise UserError(f"audio {label} declares {frames} frames of {channels} channels in {size} bytes, "
                                "more than the file can hold; it is damaged")
            data = f.read(dtype="float32", always_2d=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - soundfile raises LibsndfileError, RuntimeError, TypeError ...
        reason = " ".join(str(e).split())[:160]
        raise UserError(f"cannot read audio {label} ({reason}); use WAV, FLAC, OGG or MP3") from None
    if data.shape[0] == 0:
        raise UserError(f"audio {label} is empty (0 samples)")
    seconds = data.shape[0] / rate
    if max_seconds is not None and seconds > max_seconds:
        raise UserError(f"audio {label} is {seconds:.1f} s long, over the {max_seconds:g} s limit")
    if not np.isfinite(data).all():
        raise UserError(f"audio {label} holds NaN or infinite samples; the file is damaged")
    return to_mono_16k(data, rate)


class _Bytes(io.BytesIO):
    """Encoded audio in memory; a seek before the start (a damaged header's offset) stays put.

    io.BytesIO raises ValueError there, inside soundfile's C callback, where it can only be printed.
    """

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: len(self.getbuffer())}.get(whence, 0)
        return super().seek(offset, whence) if base + offset >= 0 else self.tell()


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 (as the speech builders store audio), clipping."""
    return np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    step = np.log(6.4) / 27.0
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(step * (mel - 15.0)))


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, rate: int = SAMPLE_RATE,
                f_max: float = 8000.0) -> np.ndarray:
    """Triangular mel filters with Slaney area normalisation.

    Filter i rises from edge i to edge i+1 and falls to edge i+2, where the n_mels + 2
    edges are evenly spaced on the mel scale from 0 Hz to f_max; each is scaled by
    2 / (width in Hz), so every filter has the same area.

    Args:
      n_mels: number of filters.
      n_fft: FFT size (n_fft // 2 + 1 frequency bins from 0 to rate / 2).
      rate: sample rate.
      f_max: upper edge (Hz).

    Returns:
      float64 [n_fft // 2 + 1, n_mels] (read-only).
    """
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    width = np.diff(edges)
    rel = edges[None, :] - bins[:, None]           # [bins, n_mels + 2]
    rising = -rel[:, :-2] / width[:-1]             # from edge i up to edge i+1
    falling = rel[:, 2:] / width[1:]               # from edge i+1 down to edge i+2
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (edges[2:] - edges[:-2])
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=1)
def _hann(n: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic: period n, not n - 1
    w.setflags(write=False)
    return w


def log_mel(audio: np.ndarray, *, n_mels: int = 80, seconds: float = MAX_SECONDS) -> np.ndarray:
    """Whisper's log-mel spectrogram of one clip, padded with silence or cut to `seconds`.

    Args:
      audio: float32 [n] mono at 16 kHz.
      n_mels: mel bands (80; 128 for large-v3).
      seconds: the window; 30 for the released Whisper checkpoints.

    Returns:
      float32 [n_mels, 100 * seconds].
    """
    frames = round(seconds * FRAMES_PER_SECOND)
    if frames <= 0:
        raise UserError(f"the audio window must be positive, got {seconds} s")
    n = frames * HOP
    x = np.zeros(n, np.float64)
    clip = np.asarray(audio, np.float64).reshape(-1)[:n]
    x[:clip.size] = clip
    half = N_FFT // 2
    padded = np.pad(x, half, mode="reflect")
    # frames + 1 centred frames; the last one is dropped, as Whisper was trained.
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:frames]
    spectrum = np.fft.rfft(windows * _hann(N_FFT), axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2                       # [frames, bins]
    mel = power @ mel_filters(n_mels)                                     # [frames, n_mels]
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).T.astype(np.float32)
