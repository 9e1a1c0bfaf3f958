"""Speech recognition through the one trainer: Whisper (tiny, from scratch) on the espeak-ng accent data.

One training run (configs/whisper_accent.py:runlocal, a few clips) is shared by the
tests: zero-shot and final scores on every eval split, the export, Predictor on an
audio file, the HF export, and an exact resume from a checkpoint.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from configs import whisper_accent
from ftjax import train
from ftjax.errors import UserError
from ftjax.tasks import speech
from tests import conftest

SPLITS = ("dev", "test", "dev_control", "test_control")


def test_normalize_folds_case_and_drops_punctuation():
    assert speech.normalize("  Don't STOP -- it's \"great\", isn't it?! ") == "dont stop its great isnt it"
    assert speech.normalize("Café\u00a0noir.") == "café noir"


@pytest.fixture(scope="module")
def tiny_en():
    return conftest.require_asset("whisper_tiny_en")


def test_whisper_text_prompt_tokens_and_constraints(tiny_en):
    text = speech.WhisperText(tiny_en, 51864, None, (1, 2, 99999))
    ids, start = text("  A fine film. ")
    assert ids[:2] == [50257, 50362] and ids[-1] == text.eot == 50256 and start == 2
    assert text.decode(ids[2:]) == "A fine film."
    assert text.decode([*ids[2:-1], text.eot, 400, 500]) == "A fine film."  # stops at EOT
    never = set(text.never())
    assert {50257, 50362, 50363, 51863, 1, 2} <= never and not never & {220, 257, 50256}
    multi = speech.WhisperText(tiny_en, 51865, "en")
    assert multi("x")[0][:4] == [50257, 50258, 50358, 50362] and multi("x")[1] == 4
    with pytest.raises(UserError, match="tokenizer.json"):
        speech.WhisperText(pathlib.Path(tiny_en).parent, 51864)


def test_speech_metrics_are_corpus_wer_and_cer_over_normalised_text(tiny_en):
    text = speech.WhisperText(tiny_en, 51864)
    m = speech.SpeechMetrics(text)
    refs = ["The cat sat.", "A dog!"]
    hyps = ["the cat sat down", "a frog"]
    enc = lambda s: text(s)[0][2:]  # noqa: E731 - text tokens + EOT
    width = 12
    labels = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    tokens = np.full((3, width), text.eot, np.int32)
    for i, (r, h) in enumerate(zip(refs, hyps)):
        labels[i, :len(enc(r))], mask[i, :len(enc(r))] = enc(r), 1
        tokens[i, :len(enc(h))] = enc(h)
    m.update({"tokens": tokens}, {"labels": labels, "label_mask": mask, "mask": np.array([1, 1, 0])})
    out = m.result()
    assert out["num_examples"] == 2
    assert out["wer"] == pytest.approx(2 / 5)  # one insertion, one substitution over 5 reference words
    assert 0 < out["cer"] < 1


def _config(data_dir, **overrides):
    c = whisper_accent.get_config("runlocal")
    with c.unlocked():
        c.data.data_dir = str(data_dir)
        c.progress_bar = False
        c.update_from_flattened_dict(overrides)
    return c.lock()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_en):
    root = tmp_path_factory.mktemp("speech")
    summary = train.train_and_evaluate(_config(root / "tfds"), str(root / "w"))
    return root, summary


def test_zero_shot_and_final_scores_on_every_eval_split(trained):
    root, summary = trained
    assert summary["final_step"] == 4 and summary["start"] == "scratch"
    for split in SPLITS:
        for when in (summary, summary["before"]):
            assert set(when[split]) == {"wer", "cer", "num_examples"}
            assert 0 <= when[split]["wer"] and when[split]["num_examples"] >= 1
    rows = [json.loads(line) for line in (root / "w" / "metrics.jsonl").read_text().splitlines()]
    assert any("before_test_control/wer" in r and r["step"] == 0 for r in rows)
    assert summary["max_audio_seconds"] == 6.0 and summary["generation"]["beams"] == 1


def _clip(root) -> pathlib.Path:
    import soundfile

    t = np.arange(16000) / 16000
    path = root / "tone.wav"
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return path


def test_predictor_transcribes_audio_files_from_the_export(trained):
    from ftjax.inference import Predictor

    root, _ = trained
    out = Predictor(str(root / "w"))([str(_clip(root)), str(_clip(root))])
    assert len(out) == 2 and all(isinstance(t, str) for t in out) and out[0] == out[1]
    with pytest.raises(UserError, match="missing.wav"):
        Predictor(str(root / "w"))([str(root / "missing.wav")])


def test_hf_export_is_a_whisper_folder_whose_weights_convert_back(trained, tmp_path):
    from safetensors.numpy import load_file

    from ftjax import checkpoint as ckpt_lib
    from ftjax import export, tree
    from ftjax.convert import whisper as whisper_convert

    root, _ = trained
    out = export.export_hf(str(root / "w"), str(tmp_path / "hf"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["WhisperForConditionalGeneration"] and config["model_type"] == "whisper"
    assert "id2label" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 50257 and generation["no_timestamps_token_id"] == 50362
    assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 80
    assert (out / "tokenizer.json").is_file()
    params, _ = ckpt_lib.load_export(str(root / "w"))
    back = whisper_convert.convert(load_file(str(out / "model.safetensors")))
    flat = tree.flatten(params)
    for k, v in flat.items():
        if k.endswith("attention/key/bias"):
            continue  # HF's k_proj has no bias (a key bias changes no attention weight)
        np.testing.assert_allclose(back["params/" + k], v, atol=1e-6, err_msg=k)
    state = tree.flatten(ckpt_lib.load_export_model_state(str(root / "w")))  # the table the model used
    np.testing.assert_array_equal(back["constants/whisper/encoder/positions"],
                                  state["constants/whisper/encoder/positions"])


def test_a_run_cut_after_a_checkpoint_continues_bitwise(trained, tmp_path):
    root, _ = trained
    work = tmp_path / "w"
    shutil.copytree(root / "w", work)
    # what a kill after the step-2 checkpoint leaves: later checkpoints, best, export, summary gone
    for p in (work / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 2:
            shutil.rmtree(p)
    for name in ("best", "export"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "summary.json").unlink()
    summary = train.train_and_evaluate(_config(root / "tfds"), str(work))
    assert summary["start"].startswith("resumed from") and summary["final_step"] == 4
    assert conftest.logged_losses(work) == conftest.logged_losses(root / "w")
    assert summary["before"] == trained[1]["before"]  # the zero-shot scores ride in the checkpoint
    assert summary["test"] == trained[1]["test"]


def test_beam_search_decodes_through_the_task_on_device(trained):
    import jax

    from ftjax import checkpoint as ckpt_lib
    from ftjax import models, tasks
    from ftjax.data import audio

    root, _ = trained
    params, meta = ckpt_lib.load_export(str(root / "w"))
    meta = {**meta, "export_dir": str(root / "w" / "export"),
            "generation": {"beams": 3, "max_new_tokens": 5, "length_penalty": 1.0}}
    task = tasks.from_meta(meta)
    model = task.build_model("whisper", meta["model_config"], models.EncoderOptions())
    variables = {"params": params, **ckpt_lib.load_export_model_state(str(root / "w"))}
    features = np.stack([audio.log_mel(np.zeros(8000, np.float32), seconds=6.0)] * 2)
    out = jax.jit(lambda v, f: task.predict(model, v, {"input_features": f}))(variables, features)
    tokens = np.asarray(out["tokens"])
    assert tokens.shape == (2, 5) and (tokens[0] == tokens[1]).all()
    assert not set(tokens.ravel().tolist()) & set(task.text.never())  # no special token but EOT
