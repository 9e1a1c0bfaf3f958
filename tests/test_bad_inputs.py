"""The bad-input catalogue: each case gives one clear error line and changes no file.

Config, data, weights and checkpoints: every case runs the trainer (or the CLI, for
flag parsing) on one bad input, expects a UserError (the CLI prints it as one
`ftjax: error:` line, exit status 2, no traceback) whose text names the problem, and
checks that every file the case could touch is byte-for-byte as before.
"""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ftjax import train
from ftjax.errors import UserError, one_line
from tests.conftest import data_files, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_files(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    """A finished tiny run: its workdir holds checkpoints and an export."""
    workdir = tmp_path_factory.mktemp("finished")
    train.train_and_evaluate(tiny_config(files, total_steps=2, eval_every_steps=2, checkpoint_every_steps=2),
                             str(workdir))
    return workdir


def _snapshot(*roots) -> dict[str, str]:
    out = {}
    for root in roots:
        root = pathlib.Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _hf_folder(tmp_path, weights: bytes | None = None, name="model.safetensors", config=True):
    d = tmp_path / "model"
    shutil.copytree(FIXTURES / "bert_tiny_random", d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    if weights is not None:
        (d / name).write_bytes(weights)
    if not config:
        (d / "config.json").unlink()
    return d


def _malicious_bin(path: pathlib.Path, marker: pathlib.Path) -> None:
    """A zip checkpoint whose pickle would run os.system('touch marker')."""
    import pickle

    class Boom:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Boom()}, protocol=2))
        z.writestr("archive/version", "3\n")


def _copy_run(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "w"
    shutil.copytree(src, dst)
    return dst


# Each case: (id, function(files, finished, tmp_path) -> (config or None, workdir, paths to
# snapshot, words the message must hold)).
def case_unknown_family(files, finished, tmp_path):
    return tiny_config(files, **{"model.family": "gpt"}), tmp_path / "w", [], "unknown model family 'gpt'"


def case_unknown_method(files, finished, tmp_path):
    return tiny_config(files, method="lorax"), tmp_path / "w", [], "unknown config.method 'lorax'"


def case_method_arg_out_of_range(files, finished, tmp_path):
    return (tiny_config(files, method="freeze", **{"method_args.freeze_bottom_k": 7}), tmp_path / "w", [],
            "freeze_bottom_k=7")


def case_batch_not_divisible(files, finished, tmp_path):
    return tiny_config(files, batch_size=12), tmp_path / "w", [], "divisible by the 8 devices"


def case_unknown_nonfinite_policy(files, finished, tmp_path):
    return tiny_config(files, nonfinite="ignore"), tmp_path / "w", [], "config.nonfinite='ignore'"


# Settings checked before the first step: the workdir stays empty (nothing trained, no checkpoint).
def case_metric_not_computed(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, metric="bleu"), w, [w], "config.metric='bleu' is not a dev metric"


def case_metric_mode_not_min_or_max(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, metric_mode="maximum"), w, [w], "config.metric_mode='maximum'"


def case_warmup_fraction_above_one(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, **{"schedule.warmup_fraction": 1.5}), w, [w], "schedule.warmup_fraction=1.5"


def case_negative_learning_rate(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, **{"optimizer.lr": -1e-3}), w, [w], "config.optimizer.lr=-0.001 must be >= 0"


def case_negative_total_steps(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, total_steps=-3), w, [w], "config.total_steps=-3 must be >= 1"


def case_zero_batch_size(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, batch_size=0), w, [w], "config.batch_size=0 must be >= 1"


def case_zero_beams(files, finished, tmp_path):
    w = tmp_path / "w"
    return tiny_config(files, **{"generation.beams": 0}), w, [w], "config.generation.beams=0"


def case_max_length_beyond_the_position_table(files, finished, tmp_path):
    # the tiny BERT has 64 positions; no row is that long, so only the early check finds it
    w = tmp_path / "w"
    return (tiny_config(files, **{"data.max_length": 100, "data.bucket_lengths": (8, 100)}), w, [w],
            "max_position_embeddings 64")


def case_workdir_is_a_file(files, finished, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a workdir\n")
    return tiny_config(files), f, [f], "is a file, not a folder"


def case_missing_data_file(files, finished, tmp_path):
    return tiny_config(files, **{"data.files.train": "/no/such/train.csv"}), tmp_path / "w", [], "/no/such/train.csv"


def case_missing_text_column(files, finished, tmp_path):
    return (tiny_config(files, **{"data.text_column": "sentence", "data.data_dir": str(tmp_path / "t")}),
            tmp_path / "w", [files["train"]], "sentence")


def case_unknown_label_in_a_row(files, finished, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text(files["train"].read_text() + "a good movie,maybe\n")
    return (tiny_config(files, **{"data.files.train": str(bad), "data.data_dir": str(tmp_path / "t"),
                                  "data.label_names": ("neg", "pos")}), tmp_path / "w", [bad], "maybe")


def case_corrupt_image(files, finished, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / c / f"{i}.png")
    (folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = tiny_config(files, **{"model.family": "resnet", "data.name": "image_folder",
                                   "data.folder": str(folder), "data.data_dir": str(tmp_path / "t"),
                                   "data.image_size": 32})
    return config, tmp_path / "w", [folder], "broken.jpg"


def case_image_folder_missing(files, finished, tmp_path):
    config = tiny_config(files, **{"model.family": "resnet", "data.name": "image_folder",
                                   "data.folder": str(tmp_path / "nope"), "data.data_dir": str(tmp_path / "t")})
    return config, tmp_path / "w", [], "nope"


def case_weights_folder_without_config(files, finished, tmp_path):
    d = _hf_folder(tmp_path, (FIXTURES / "bert_tiny_random" / "model.safetensors").read_bytes(), config=False)
    return (tiny_config(files, **{"model.pretrained": str(d), "model.variant": None}), tmp_path / "w", [d],
            "config.json")


def case_truncated_safetensors(files, finished, tmp_path):
    data = (FIXTURES / "bert_tiny_random" / "model.safetensors").read_bytes()
    d = _hf_folder(tmp_path, data[: len(data) // 2])
    return (tiny_config(files, **{"model.pretrained": str(d), "model.variant": None}), tmp_path / "w", [d],
            "model.safetensors")


def case_malicious_pickle_weights(files, finished, tmp_path):
    d = _hf_folder(tmp_path, None)
    marker = tmp_path / "pwned"
    _malicious_bin(d / "pytorch_model.bin", marker)
    case_malicious_pickle_weights.marker = marker
    return (tiny_config(files, **{"model.pretrained": str(d), "model.variant": None}), tmp_path / "w", [d],
            "refuses pickle global")


def case_weights_of_another_shape(files, finished, tmp_path):
    # the fixture BERT has hidden size 32 and a 99-word vocabulary; this model's
    # tokenizer and config are different: the strict merge names the mismatch
    d = _hf_folder(tmp_path, (FIXTURES / "bert_tiny_random" / "model.safetensors").read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    return (tiny_config(files, **{"model.pretrained": str(d), "model.variant": None}), tmp_path / "w", [d],
            "intermediate")


def case_workdir_of_another_model(files, finished, tmp_path):
    w = _copy_run(finished, tmp_path)
    return tiny_config(files, **{"data.label_names": ("neg", "pos", "other")}), w, [w], "different model"


def case_corrupt_checkpoint(files, finished, tmp_path):
    w = _copy_run(finished, tmp_path)
    step = max(p for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    for f in (step / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:32])  # truncated
    return tiny_config(files), w, [w], str(step)


def case_unreadable_fingerprint(files, finished, tmp_path):
    w = _copy_run(finished, tmp_path)
    (w / "fingerprint.json").write_text("{not json")
    return tiny_config(files), w, [w], "fingerprint.json"


def case_init_from_not_an_export(files, finished, tmp_path):
    (tmp_path / "empty").mkdir()
    return tiny_config(files, init_from=str(tmp_path / "empty")), tmp_path / "w", [], "not an ftjax export"


def case_empty_label_cell(files, finished, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text(files["train"].read_text() + "a film with no label,\n")
    return (tiny_config(files, **{"data.files.train": str(bad), "data.data_dir": str(tmp_path / "t")}),
            tmp_path / "w", [bad], "empty label")


def case_csv_not_utf8(files, finished, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_bytes(files["train"].read_bytes() + "un caf\xe9 fade,neg\n".encode("latin-1"))
    return (tiny_config(files, **{"data.files.train": str(bad), "data.data_dir": str(tmp_path / "t")}),
            tmp_path / "w", [bad], "not UTF-8")


# ---- speech: audio files, manifests and CTranslate2 weights (tiny Whisper from scratch) ----

def _speech(tmp_path, rows=None, **overrides):
    """A speech_manifest run over tones; `rows` replaces the train manifest's (file, text) rows."""
    from configs import whisper_accent
    from tests import test_speech_data
    from tests.conftest import require_asset

    require_asset("whisper_tiny_en")
    d = tmp_path / "speech"
    good = test_speech_data.write_clips(d / "clips", 4, seed=0)
    train = test_speech_data.write_manifest(d / "train.csv", good if rows is None else rows, "clips/")
    dev = test_speech_data.write_manifest(d / "dev.csv", good, "clips/")
    c = whisper_accent.get_config("runlocal")
    with c.unlocked():
        c.update_from_flattened_dict({
            "data.name": "speech_manifest", "data.data_dir": str(tmp_path / "tfds"), "data.files.train": str(train),
            "data.files.dev": str(dev), "data.test_split": None, "data.max_audio_seconds": 1.0,
            "batch_size": 8, "eval_batch_size": 8, **overrides})
    return c.lock(), tmp_path / "w", [d]


def case_speech_manifest_row_without_text(files, finished, tmp_path):
    config, w, watched = _speech(tmp_path, [("c0.wav", "one two"), ("c1.wav", "")])
    return config, w, watched, "train.csv:3"


def case_speech_unreadable_audio(files, finished, tmp_path):
    config, w, watched = _speech(tmp_path)
    (watched[0] / "clips" / "c1.wav").write_bytes(b"RIFF\0\0\0\0WAVEjunk")
    return config, w, watched, "c1.wav"


def case_speech_empty_audio(files, finished, tmp_path):
    import soundfile

    config, w, watched = _speech(tmp_path)
    soundfile.write(watched[0] / "clips" / "c2.wav", np.zeros(0, np.float32), 16000)
    return config, w, watched, "c2.wav"


def case_speech_clip_longer_than_the_window(files, finished, tmp_path):
    import soundfile

    config, w, watched = _speech(tmp_path, **{"data.max_audio_seconds": 30.0})
    soundfile.write(watched[0] / "clips" / "c3.wav", np.zeros(31 * 16000, np.float32), 16000)
    return config, w, watched, "c3.wav"


def _ct2_folder(tmp_path, blob) -> pathlib.Path:
    from tests import test_ctranslate2

    return test_ctranslate2._whisper_folder(tmp_path / "ct2", blob)


def case_ctranslate2_of_another_model_type(files, finished, tmp_path):
    from tests import test_ctranslate2 as t

    d = _ct2_folder(tmp_path, t._model([t._var("encoder/layer_0/x", np.ones(2, np.float32))],
                                       spec="TransformerSpec"))
    config, w, watched = _speech(tmp_path, **{"model.pretrained": str(d), "model.variant": None})
    return config, w, [*watched, d], "TransformerSpec, not a Whisper model"


def case_ctranslate2_quantized_int8(files, finished, tmp_path):
    from tests import test_ctranslate2 as t

    d = _ct2_folder(tmp_path, t._model([*t._whisper_vars(), t._var("encoder/layer_0/ffn/linear_1/weight",
                                                                   np.ones((8, 24), np.int8)),
                                        t._var("encoder/layer_0/ffn/linear_1/weight_scale", np.ones(8, np.float32))]))
    config, w, watched = _speech(tmp_path, **{"model.pretrained": str(d), "model.variant": None})
    return config, w, [*watched, d], "quantized (int8)"


def _prompts(tmp_path, rows=None, **overrides):
    """A tiny causal_lm run on local_prompts files (tests/test_causal_lm.py's setting)."""
    from tests import test_causal_lm as t

    d = tmp_path / "lm"
    d.mkdir()
    train_file = t.write_rows(d / "train.jsonl", 8, 0)
    if rows is not None:
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = {"tok": t.write_tokenizer(d / "tok"), "train": train_file, "dev": t.write_rows(d / "dev.jsonl", 4, 1),
         "root": d}
    return t._config(s, **overrides), tmp_path / "w", [s["tok"], s["train"], s["dev"]]


def case_gguf_of_an_unsupported_architecture(files, finished, tmp_path):
    from tests import test_gguf

    folder = tmp_path / "gguf"
    folder.mkdir()
    test_gguf.write_tiny(folder / "model.gguf", arch="qwen2")
    config, w, watched = _prompts(tmp_path, **{"model.pretrained": str(folder), "model.family": None,
                                               "model.variant": None})
    return config, w, [*watched, folder], "GGUF architecture 'qwen2' is not supported (supported: llama)"


def case_prompt_longer_than_the_context(files, finished, tmp_path):
    long = {"prompt": "say " + " ".join(["red"] * 40), "response": "red"}
    config, w, watched = _prompts(tmp_path, rows=[long] * 8)
    return config, w, watched, "longer than the context"


def case_empty_response_in_the_data(files, finished, tmp_path):
    rows = [{"prompt": "say red", "response": "red"}] * 4 + [{"prompt": "say cat", "response": " "}]
    config, w, watched = _prompts(tmp_path, rows=rows * 2)
    return config, w, watched, "train.jsonl:5: empty response in column 'response'"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_one_clear_line_and_nothing_changed(case, files, finished, tmp_path):
    config, workdir, watched, words = case(files, finished, tmp_path)
    watched = [*watched, files["train"], files["dev"], files["vocab"], finished]
    before = _snapshot(*watched)
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(config, str(workdir))
    message = one_line(str(e.value))
    assert words in message, message
    assert len(message) < 600
    assert _snapshot(*watched) == before
    marker = getattr(case, "marker", None)
    assert marker is None or not marker.exists(), "the pickle ran code"


def test_catalogue_has_at_least_15_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("flag,words", [
    ("--config.model.famly=bert", "unknown key"),
    ("--config.batch_size=many", "batch_size"),
    ("--config=configs/no_such_config.py", "no_such_config.py"),
])
def test_cli_flag_errors_are_one_line_without_traceback(flag, words):
    args = [sys.executable, "-m", "ftjax.main", "--config=configs/bert_sst2.py:demo", "--workdir=/tmp/unused", flag]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftjax: error:") and words in lines[0], r.stderr[-1500:]
    assert not pathlib.Path("/tmp/unused").exists()
