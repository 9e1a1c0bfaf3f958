"""Whisper tiny.en (the pinned CTranslate2 float16 asset) against CTranslate2 itself on real speech.

tests/fixtures/make_whisper_ct2_fixtures.py wrote three espeak-ng clips (en-us, en-029,
en-gb-scotland), transformers' log-mel features of them, CTranslate2's encoder output
(float32 compute; the first 200 and last 50 positions, every other channel) and its
greedy transcription ids (suppress_blank, the config's suppress_ids). Here ftjax reads
the clips, computes the features, loads the same model.bin and transcribes through
`SpeechRecognition.predict`, the task's own on-device decoding path.
"""

import json
import time

import jax
import numpy as np
import pytest

from ftjax import convert, models, tree
from ftjax.data import audio
from ftjax.models.family import EncoderOptions
from ftjax.tasks import speech
from tests import conftest, family_checks

FIXTURES = family_checks.FIXTURES / "whisper_ct2"
MAX_NEW_TOKENS = 64


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "outputs.npz"))


@pytest.fixture(scope="module")
def clips() -> dict[str, dict]:
    return json.loads((FIXTURES / "meta.json").read_text())["clips"]


@pytest.fixture(scope="module")
def setup():
    """(the SpeechRecognition task, its model, the asset's converted variables)."""
    folder = conftest.require_asset("whisper_tiny_en")
    hf = models.load_hf_config(folder)
    text = speech.WhisperText(folder, hf["vocab_size"], None, hf["suppress_tokens"])
    task = speech.SpeechRecognition(text, {"beams": 1, "max_new_tokens": MAX_NEW_TOKENS, "length_penalty": 1.0},
                                    {})
    model = task.build_model("whisper", hf, EncoderOptions())
    variables = convert.convert_variables(folder, "whisper")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs()))
    got = {k: v.shape for k, v in tree.flatten(variables).items()}
    assert got == {k: v.shape for k, v in tree.flatten(shapes).items()}  # nothing missing, extra or misshapen
    return task, model, variables


def test_features_of_the_clips_match_hf(ref, clips):
    for i, (name, clip) in enumerate(clips.items()):
        samples = audio.read_audio(FIXTURES / f"{name}.flac")
        assert samples.shape == (clip["samples"],)
        features = audio.log_mel(samples)
        assert features.shape == ref["features"][i].shape == (80, 3000)
        np.testing.assert_allclose(features, ref["features"][i], atol=1e-4, rtol=0, err_msg=name)


def test_encoder_matches_ctranslate2(ref, setup):
    _, model, variables = setup
    start = time.perf_counter()
    encoded = np.asarray(jax.jit(lambda v, x: model.apply(v, x, call="encode"))(variables, ref["features"]))
    print(f"encoder (jit + run, 3 x 30 s): {time.perf_counter() - start:.1f} s")
    assert encoded.shape == (3, 1500, 384)
    first, last = encoded[:, :200, ::2], encoded[:, -50:, ::2]
    diff = max(np.abs(first - ref["encoder_first"]).max(), np.abs(last - ref["encoder_last"]).max())
    print(f"max |ftjax - CTranslate2| encoder output: {diff:.2e}")
    assert diff <= 1e-3, f"max |ftjax - CTranslate2| encoder output = {diff:.3g}"


def test_predict_transcribes_as_ctranslate2(ref, setup, clips):
    task, model, variables = setup
    start = time.perf_counter()
    predict = jax.jit(lambda v, x: task.predict(model, v, {"input_features": x})["tokens"])
    tokens = np.asarray(predict(variables, ref["features"]))
    print(f"predict (jit + run, 3 clips): {time.perf_counter() - start:.1f} s")
    assert tokens.shape == (3, MAX_NEW_TOKENS)
    eot = task.text.eot
    for row, want, hf, (name, clip) in zip(tokens, ref["ct2_ids"], ref["hf_ids"], clips.items()):
        want = want[want >= 0].tolist()  # CTranslate2's ids, ending in EOT
        assert want[-1] == eot and eot not in want[:-1]
        assert hf[hf >= 0].tolist() == want  # transformers agreed when the fixtures were made
        assert row[:len(want)].tolist() == want, (name, task.text.decode(row), clip["ct2_text"])
        assert task.text.decode(row) == clip["ct2_text"].strip()
