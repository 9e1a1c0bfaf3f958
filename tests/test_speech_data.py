"""Speech builders (speech_manifest, audio_folder, accent_speech, TFDS catalog) and SpeechData."""

import bz2
import json
import os
import pathlib

import numpy as np
import pytest
import soundfile as sf

from configs import common
from ftjax.data import audio, builders, speech, tfds_sources
from ftjax.data.builders import accent_speech, speech_manifest
from ftjax.errors import UserError

WORDS = ["the", "cat", "sat", "on", "a", "warm", "mat", "near", "my", "old", "red", "door"]
PROMPT, EOT = [1, 2], 3


def tokenize(text: str):
    """A toy Whisper-like tokenizer: two prompt ids, one id per character, the end id."""
    return PROMPT + [10 + ord(ch) % 50 for ch in text] + [EOT], len(PROMPT)


def write_clips(folder: pathlib.Path, n: int, seed: int, rate: int = 8000) -> list[tuple[str, str]]:
    """n short tones (0.1-0.4 s at `rate`) with word transcripts; returns (file name, text)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        t = np.arange(int(rate * rng.uniform(0.1, 0.4))) / rate
        sf.write(folder / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t), rate, subtype="PCM_16")
        rows.append((f"c{i}.wav", " ".join(rng.choice(WORDS, size=rng.integers(1, 4)))))
    return rows


def write_manifest(path: pathlib.Path, rows, prefix: str = "") -> pathlib.Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"audio_path": prefix + f, "text": t}) + "\n" for f, t in rows))
    else:
        path.write_text("audio_path,text,speaker\n" + "".join(f"{prefix}{f},{t},s{i % 2}\n"
                                                                for i, (f, t) in enumerate(rows)))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    train = write_clips(root / "clips", 6, seed=0)
    dev = write_clips(root / "clips_dev", 3, seed=1)
    return {"root": root, "data_dir": root / "tfds", "rows": {"train": train, "dev": dev},
            "train": write_manifest(root / "train.csv", train, "clips/"),
            "dev": write_manifest(root / "dev.jsonl", dev, "clips_dev/")}


def speech_config(files, **overrides):
    c = common.base_config()
    c.data.name = "speech_manifest"
    c.data.data_dir = str(files["data_dir"])
    c.data.files.train, c.data.files.dev = str(files["train"]), str(files["dev"])
    c.data.max_audio_seconds = 0.5
    c.data.max_target_length = 32
    c.data.bucket_lengths = (8, 16, 32)
    c.batch_size, c.eval_batch_size = 4, 4
    for key, value in overrides.items():
        node = c
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    c.lock()
    return c


# ---- builders ------------------------------------------------------------------------------------

def test_manifest_builder_stores_16k_int16(files):
    b = builders.prepare(lambda: speech_manifest.make_builder(
        {"train": str(files["train"]), "dev": str(files["dev"])}, str(files["data_dir"])), str(files["data_dir"]))
    train = b.as_data_source("train")
    assert len(train) == 6 and len(b.as_data_source("dev")) == 3
    by_id = {r["id"].decode(): r for r in (train[i] for i in range(6))}
    for i, (name, text) in enumerate(files["rows"]["train"]):
        record = by_id["clips/" + name]
        expected = audio.to_int16(audio.read_audio(files["root"] / "clips" / name))
        assert record["audio"].dtype == np.int16
        np.testing.assert_array_equal(record["audio"], expected)
        assert record["text"].decode() == text and record["speaker"].decode() == f"s{i % 2}"


def test_manifest_name_follows_contents_and_settings(files, tmp_path):
    make = lambda **kw: speech_manifest.make_builder({"train": str(files["train"])}, str(tmp_path), **kw)
    first = make().builder_config.name
    assert make().builder_config.name == first
    assert make(max_seconds=5.0).builder_config.name != first
    assert make(speaker_column="who").builder_config.name != first
    copy = tmp_path / "train.csv"
    copy.write_text(files["train"].read_text())
    clip = tmp_path / "clips"
    clip.mkdir()
    for name, _ in files["rows"]["train"]:
        (clip / name).write_bytes((files["root"] / "clips" / name).read_bytes())
    name = speech_manifest.make_builder({"train": str(copy)}, str(tmp_path)).builder_config.name
    os.utime(clip / "c0.wav", ns=(0, 0))  # an audio file changed (its mtime)
    assert speech_manifest.make_builder({"train": str(copy)}, str(tmp_path)).builder_config.name != name


BAD_ROWS = {
    "empty transcript": ("audio_path,text\nok.wav,hello\nok.wav,  \n", "train.csv:3: empty transcript"),
    "missing audio": ("audio_path,text\nok.wav,hi\nnope.wav,hello\n", "train.csv:3: audio file nope.wav does not exist"),
    "unreadable audio": ("audio_path,text\njunk.wav,hello\n", "train.csv:2: cannot read audio junk.wav"),
    "empty audio": ('{"audio_path": "ok.wav", "text": "a"}\n{"audio_path": "empty.wav", "text": "b"}\n',
                    "train.jsonl:2: audio empty.wav is empty"),
    "too long": ("audio_path,text\nlong.wav,hello\n", "train.csv:2: audio long.wav is 2.0 s long, over the 1 s"),
    "no text column": ("audio_path,words\nok.wav,hello\n", "train.csv:1: no column 'text' (data.speech.text_column)"),
    "no rows": ("audio_path,text\n", "train.csv: no rows"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_manifest_bad_rows_name_file_and_line(tmp_path, case):
    content, expected = BAD_ROWS[case]
    sf.write(tmp_path / "ok.wav", np.full(800, 0.1, np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(32000, np.float32), 16000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    path = tmp_path / ("train.jsonl" if content.startswith("{") else "train.csv")
    path.write_text(content)
    with pytest.raises(UserError) as e:
        builders.prepare(lambda: speech_manifest.make_builder({"train": str(path)}, str(tmp_path / "tfds"),
                                                              max_seconds=1.0), str(tmp_path / "tfds"))
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_audio_folder_layout(tmp_path):
    root = tmp_path / "af"
    train = write_clips(root / "train", 4, seed=3, rate=22050)
    dev = write_clips(root / "dev", 2, seed=4)
    (root / "train" / "metadata.csv").write_text("file_name,text\n" + "".join(f"{f},{t}\n" for f, t in train))
    (root / "dev" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n"
                                                         for f, t in dev))
    c = speech_config({"data_dir": tmp_path / "tfds", "train": "", "dev": ""}, data__name="audio_folder",
                      data__speech__root=str(root))
    sources = tfds_sources.load_sources(c)
    assert sorted(sources.splits) == ["dev", "train"] and sources.audio_key == "audio"
    record = sources.splits["dev"][0]
    name = record["id"].decode()
    np.testing.assert_array_equal(record["audio"], audio.to_int16(audio.read_audio(root / "dev" / name)))
    assert record["text"].decode() == dict(dev)[name]
    (root / "test").mkdir()
    (root / "test" / "metadata.csv").write_text("file_name,text\n")
    (root / "test" / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="has both metadata.csv and metadata.jsonl"):
        speech_manifest.folder_manifests(str(root))


# ---- accent demo ---------------------------------------------------------------------------------

SHORT = ["A quiet film about a lonely cook.", "The actors seem to enjoy it.", "It never finds its rhythm.",
         "A modest but honest little movie.", "Every scene feels strangely familiar.", "The story drags in places.",
         "Funny, warm and very well acted.", "The ending makes little sense."]
LONG = [("This sprawling and baffling picture keeps piling subplots on subplots until even patient viewers stop "
         "caring at all."),
        ("Despite a handsome production and a committed lead, the film wanders for two hours without deciding what "
         "it wants.")]


def write_corpus(path: pathlib.Path) -> pathlib.Path:
    rows = ["category,text,movie_name,has_plot_and_reviews"]
    odd = ["It cost 20 million dollars.", "Wow", 'He said "no" twice to me.', SHORT[0].upper()]
    for i, text in enumerate(SHORT + LONG + odd + [f"{SHORT[1]} {SHORT[2]}"]):
        rows.append(f"{'fresh' if i % 2 else 'rotten'},\"{text}\",Movie {i},True")
    rows.append('plot,"A plot line that is not a review at all.",Movie 0,True')
    with bz2.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_sentences_filter_and_deal():
    pool = accent_speech.sentences(SHORT + LONG + ["It cost 20 million dollars. Wow. Too short", "Odd #tag here now"])
    assert pool == sorted(SHORT + LONG)
    dealt = accent_speech.deal(pool, {"dev": 2, "test": 2, "dev_control": 1, "test_control": 1, "train": 3}, 0)
    assert [len(dealt[s]) for s in accent_speech.SPLITS] == [2, 2, 1, 1, 3]
    assert len({s for v in dealt.values() for s in v}) == 9  # no sentence in two splits
    assert dealt == accent_speech.deal(pool, {"dev": 2, "test": 2, "dev_control": 1, "test_control": 1,
                                              "train": 3}, 0)
    with pytest.raises(UserError, match="needs 11 sentences"):
        accent_speech.deal(pool, {"train": 11}, 0)


def test_accent_builder_tiny(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.csv.bz2")
    sizes = (("dev", 2), ("test", 1), ("dev_control", 1), ("test_control", 1), ("train", 5))
    make = lambda **kw: accent_speech.make_builder(str(corpus), str(tmp_path / "tfds"), sizes=sizes,
                                                   max_seconds=4.0, **kw)
    # Without espeak-ng on PATH (a fresh CI machine), this goes through ensure_espeak's install.
    b = builders.prepare(make, str(tmp_path / "tfds"))
    assert b.info.metadata["espeak_ng"].startswith("eSpeak NG")
    assert make().info.metadata["espeak_ng"] == b.info.metadata["espeak_ng"]  # kept with the prepared data
    counts = {s: b.info.splits[s].num_examples for s in accent_speech.SPLITS}
    assert counts["dev"] == 2 and counts["test"] == 1 and counts["dev_control"] == counts["test_control"] == 1
    assert counts["train"] == 3  # the two long sentences (> 4 s) were dealt to train and dropped
    seen = set()
    for split in accent_speech.SPLITS:
        source = b.as_data_source(split)
        for i in range(len(source)):
            r = source[i]
            assert r["audio"].dtype == np.int16 and 0.5 * 16000 < r["audio"].size <= 4 * 16000
            accent = "en-us" if split.endswith("_control") else "en-029"
            assert r["speaker"].decode().startswith(accent + "+") and r["id"].decode().startswith(split + "/")
            seen.add(r["text"].decode())
    assert len(seen) == 8
    assert make(seed=1).builder_config.name != b.builder_config.name
    assert make(voices=("m1",)).builder_config.name != b.builder_config.name
    assert make(workers=1).builder_config.name == b.builder_config.name
    with pytest.raises(UserError, match="data.speech.pitches"):
        make(pitches=(50, 120))


def test_espeak_install_path(monkeypatch):
    calls, installed = [], []

    def which(name):
        if name == "apt-get":
            return "/usr/bin/apt-get"
        return "/usr/bin/espeak-ng" if installed else None

    class Result:
        def __init__(self, code):
            self.returncode, self.stderr = code, b"E: Unable to locate package espeak-ng"

    def run(cmd, **kwargs):
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "update"]:
            return Result(0)
        ok = len(calls) > 1  # the first install fails: the package lists are missing
        installed.extend([True] if ok else [])
        return Result(0 if ok else 100)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert accent_speech.ensure_espeak(run=run, which=which) == "/usr/bin/espeak-ng"
    install = ["apt-get", "install", "-y", "--no-install-recommends", accent_speech.ESPEAK_PACKAGE]
    assert calls == [install, ["apt-get", "update"], install]
    # another distribution: the pinned version is unknown even after an update; its own is installed
    calls.clear()
    installed.clear()

    def run_elsewhere(cmd, **kwargs):
        calls.append(cmd)
        ok = cmd[-1] == "espeak-ng" or cmd[:2] == ["apt-get", "update"]
        installed.extend([True] if ok and cmd[-1] == "espeak-ng" else [])
        return Result(0 if ok else 100)

    assert accent_speech.ensure_espeak(run=run_elsewhere, which=which) == "/usr/bin/espeak-ng"
    assert calls == [install, ["apt-get", "update"], install, install[:-1] + ["espeak-ng"]]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="needs espeak-ng: install it .*apt-get install"):
        accent_speech.ensure_espeak(run=run, which=lambda name: None)


# ---- TFDS catalog --------------------------------------------------------------------------------

def test_catalog_librispeech(tmp_path):
    """With TensorFlow: mock_data through SpeechData. Without: one line saying what to install."""
    c = speech_config({"data_dir": tmp_path, "train": "", "dev": ""}, data__name="librispeech",
                      data__train_split="train_clean100", data__dev_split="dev_clean",
                      data__speech__extra_eval_splits=("test_other",), data__max_audio_seconds=1.0)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="'librispeech' needs TensorFlow .*speech_manifest") as e:
            speech.SpeechData(c, tokenize)
        assert "\n" not in str(e.value)
        return
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        data = speech.SpeechData(c, tokenize)
        assert data.eval_splits == ["dev", "test_other"]
        batch = next(iter(data.eval_batches("test_other")))
    assert batch["input_features"].shape == (4, 80, 100)


# ---- SpeechData ----------------------------------------------------------------------------------

def expected_rows(batch, row):
    """(ids, loss_start) recovered from a batch row's labels and mask, for comparisons."""
    n = int((batch["labels"][row] != 0).sum())
    return [int(batch["decoder_input_ids"][row, 0]), *batch["labels"][row, :n].tolist()]


def test_speech_batches(files):
    data = speech.SpeechData(speech_config(files), tokenize)
    assert data.steps_per_epoch == 1 and data.eval_splits == ["dev"] and not data.has_split("test")
    batch = next(iter(data.train_batches()))
    assert set(batch) == {"input_features", "decoder_input_ids", "labels", "label_mask"}
    assert batch["input_features"].shape == (4, 80, 50) and batch["input_features"].dtype == np.float32
    texts = dict(files["rows"]["train"])
    names = list(texts)
    # What the builder stored: the clip at 16 kHz, as int16.
    clips = np.stack([audio.log_mel(audio.to_int16(audio.read_audio(files["root"] / "clips" / f)) / 32768.0,
                                    seconds=0.5) for f in names])
    length = batch["labels"].shape[1]
    longest = 0
    for row in range(4):
        gaps = np.abs(clips - batch["input_features"][row]).max(axis=(1, 2))
        assert gaps.min() < 1e-5  # the row's features are those of one of the clips
        text = texts[names[int(gaps.argmin())]]
        ids, start = tokenize(text)
        n = len(ids) - 1
        longest = max(longest, n)
        assert batch["decoder_input_ids"][row, :n].tolist() == ids[:-1]
        assert batch["labels"][row, :n].tolist() == ids[1:]
        assert batch["label_mask"][row].tolist() == [0] * (start - 1) + [1] * (n - start + 1) + [0] * (length - n)
    assert length == min(b for b in (8, 16, 32) if b >= longest)
    assert batch["decoder_input_ids"].dtype == batch["labels"].dtype == batch["label_mask"].dtype == np.int32


def test_speech_batches_resume_exactly_and_slice_per_process(files):
    c = speech_config(files, data__train_limit=6, batch_size=2)
    stream = speech.SpeechData(c, tokenize).train_batches()
    first = [next(stream) for _ in range(5)]
    resumed = next(speech.SpeechData(c, tokenize).train_batches(start_step=4))
    for key in first[4]:
        np.testing.assert_array_equal(resumed[key], first[4][key])
    halves = [next(speech.SpeechData(c, tokenize, process_index=p, process_count=2).train_batches(start_step=4))
              for p in range(2)]
    for key in first[4]:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[4][key])


def test_speech_eval_batches_pad_and_carry_references(files):
    data = speech.SpeechData(speech_config(files), tokenize)
    batches = list(data.eval_batches("dev"))
    assert len(batches) == 1 and data.num_examples("dev") == 3
    batch = batches[0]
    assert batch["mask"].tolist() == [1, 1, 1, 0] and batch["index"].tolist()[:3] == [0, 1, 2]
    refs = sorted(t for _, t in files["rows"]["dev"])
    assert sorted(batch["text"][:3].tolist()) == refs
    with pytest.raises(UserError, match="no test split"):
        data.num_examples("test")


def test_long_transcripts_are_cut(files):
    data = speech.SpeechData(speech_config(files, data__max_target_length=4, data__bucket_lengths=(4,)), tokenize)
    batch = next(iter(data.train_batches()))
    assert batch["labels"].shape == (4, 4)
    # every transcript is longer than 3 ids after the prompt: rows are cut, none ends with EOT
    assert (batch["label_mask"][:, 1:] == 1).all() and EOT not in batch["labels"].tolist()


def test_extra_eval_roles_and_catalog_style_records(files, monkeypatch):
    """Roles beyond dev/test (accent_speech's controls), int64 48 kHz stereo audio (Common Voice-like)."""
    rng = np.random.default_rng(0)
    rows = [{"voice": (rng.standard_normal((4800 * (1 + i % 3), 2)) * 3000).astype(np.int64),
             "sentence": f"the cat {WORDS[i]}".encode()} for i in range(6)]
    sources = tfds_sources.Sources(name="fake", splits={"train": rows, "dev": rows[:2], "dev_control": rows[2:5]},
                                   split_names={"train": "train", "dev": "dev", "dev_control": "dev_control"},
                                   text_keys=("sentence",), label_key="", label_names=[], regression=False,
                                   audio_key="voice", sample_rate=48000)
    monkeypatch.setattr(tfds_sources, "load_sources", lambda config, labels=True: sources)
    data = speech.SpeechData(speech_config(files), tokenize)
    assert data.eval_splits == ["dev", "dev_control"] and data.num_examples("dev_control") == 3
    batch = next(iter(data.eval_batches("dev_control")))
    import soxr

    mono = rows[2]["voice"].mean(axis=1) / 32768  # 16-bit PCM values, 48 kHz stereo
    expected = audio.log_mel(soxr.resample(mono.astype(np.float32), 48000, 16000), seconds=0.5)
    np.testing.assert_allclose(batch["input_features"][0], expected, atol=1e-5)
    assert batch["mask"].tolist() == [1, 1, 1, 0] and batch["text"][0] == f"the cat {WORDS[2]}"
