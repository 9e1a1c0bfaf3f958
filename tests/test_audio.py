"""ftjax.data.audio: decoding, resampling and Whisper's log-mel features (HF parity)."""

import pathlib

import numpy as np
import pytest
import soundfile as sf

from ftjax.data import audio
from ftjax.errors import UserError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "whisper_audio"
CLIPS = ("chirp_7s", "noise_1s", "silence_tail", "tone_1s")


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "features.npz"))


@pytest.mark.parametrize("name", CLIPS)
def test_log_mel_matches_hf_feature_extractor(reference, name):
    features = audio.log_mel(audio.read_audio(FIXTURES / f"{name}.flac"))
    assert features.shape == (80, 3000) and features.dtype == np.float32
    np.testing.assert_allclose(features, reference[name], atol=1e-4, rtol=0)


def test_log_mel_128_bands_matches_hf(reference):
    features = audio.log_mel(audio.read_audio(FIXTURES / "chirp_7s.flac"), n_mels=128)
    np.testing.assert_allclose(features, reference["chirp_7s_128"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ("chirp_7s", "tone_1s"))
def test_shorter_window_is_the_start_of_the_30s_window(reference, name):
    """A clip well inside 10 s: same frames and the same maximum, so the same numbers."""
    features = audio.log_mel(audio.read_audio(FIXTURES / f"{name}.flac"), seconds=10.0)
    assert features.shape == (80, 1000)
    np.testing.assert_allclose(features, reference[name][:, :1000], atol=1e-4, rtol=0)


def test_log_mel_cuts_long_audio_and_pads_short():
    rng = np.random.default_rng(0)
    long = rng.standard_normal(3 * audio.SAMPLE_RATE).astype(np.float32) * 0.1
    np.testing.assert_array_equal(audio.log_mel(long, seconds=1.0), audio.log_mel(long[:16000], seconds=1.0))
    silent = audio.log_mel(np.zeros(10, np.float32), seconds=0.5)
    assert silent.shape == (80, 50)
    np.testing.assert_allclose(silent, (-10 + 4) / 4)  # log10 floor 1e-10, max - 8 below it


def test_mel_filters_shape_and_slaney_area():
    filters = audio.mel_filters(80)
    assert filters.shape == (201, 80) and (filters >= 0).all()
    # Slaney normalisation: each triangle has unit area in Hz; wide (high) filters,
    # sampled by many 40 Hz bins, sum to it closely.
    areas = filters.sum(axis=0) * (audio.SAMPLE_RATE / 2 / 200)
    np.testing.assert_allclose(areas[41:], 1.0, rtol=0.02)
    assert np.argmax(filters[:, 0]) == 1 and filters[:, -1].nonzero()[0].max() < 200  # 0 .. 8 kHz


def test_read_audio_resamples_and_averages_channels(tmp_path):
    rate = 44100
    t = np.arange(rate // 2) / rate
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    sf.write(tmp_path / "stereo.wav", np.stack([left, 0.0 * left], axis=1), rate, subtype="FLOAT")
    x = audio.read_audio(tmp_path / "stereo.wav")
    assert x.dtype == np.float32 and x.ndim == 1 and x.size == 8000
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * audio.SAMPLE_RATE / x.size - 1000) <= 2
    assert abs(np.abs(x[1000:7000]).max() - 0.25) < 0.01  # the mean of the two channels
    # bytes in, and integer PCM at 16 kHz comes back exactly (no resampling)
    pcm = (np.arange(-500, 500) * 30).astype(np.int16)
    sf.write(tmp_path / "pcm.wav", pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(audio.read_audio((tmp_path / "pcm.wav").read_bytes()), pcm / 32768.0)
    np.testing.assert_array_equal(audio.to_int16(pcm / 32768.0), pcm)


def test_bad_audio_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(3 * 8000, np.float32), 8000)
    cases = {"missing.wav": "does not exist", "junk.wav": "cannot read audio",
             "empty.wav": "is empty", "long.wav": "3.0 s long, over the 2 s limit"}
    for name, why in cases.items():
        with pytest.raises(UserError) as e:
            audio.read_audio(tmp_path / name, max_seconds=2)
        message = str(e.value)
        assert name in message and why in message and "\n" not in message, message
    assert audio.read_audio(tmp_path / "long.wav", max_seconds=None).size == 3 * 16000
