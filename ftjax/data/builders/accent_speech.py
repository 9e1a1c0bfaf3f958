"""An offline accent-adaptation demo: movie-review sentences spoken by espeak-ng.

The sentences come from the pinned Rotten Tomatoes snippets (asset "rotten_tomatoes"):
each snippet is cut into sentences, and a sentence is kept when it has 4 to 20 words of
ASCII letters with plain punctuation (no digits, quotes or symbols). The unique
sentences (case and punctuation ignored), sorted, are shuffled with data.speech.seed and
dealt out in order to dev, test, dev_control, test_control and train, so no sentence is
in two splits.

train, dev and test are spoken with the target accent (data.speech.accent, default
"en-029", espeak-ng's Caribbean English), dev_control and test_control with the control
accent (data.speech.control_accent, default "en-us"), which tells whether adapting to
one accent costs another. Each clip draws its speaker (a voice variant of
data.speech.voices), speed (words a minute) and pitch from a generator seeded by
(seed, split, index), is resampled from espeak-ng's 22.05 kHz to 16 kHz and stored as
int16; clips longer than data.speech.max_seconds are dropped. The espeak-ng version is
recorded in the dataset's metadata (`info.metadata["espeak_ng"]`).

espeak-ng must be installed; on a machine without it, run as root, the builder installs
the pinned Debian package (ESPEAK_PACKAGE) with apt-get.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import audio as audio_lib
from ftjax.data.builders import rotten_tomatoes, speech_manifest
from ftjax.errors import UserError

ESPEAK = "espeak-ng"
ESPEAK_PACKAGE = "espeak-ng=1.51+dfsg-10+deb12u2"  # Debian 12's; what the demo numbers were made with
# Split order of the deal: eval splits first, so their sizes never depend on train's.
SPLITS = ("dev", "test", "dev_control", "test_control", "train")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ALLOWED = re.compile(r"[A-Za-z][A-Za-z' ,;:-]*[A-Za-z][.!?]?")


@dataclasses.dataclass(eq=False)
class AccentSpeechConfig(tfds.core.BuilderConfig):
    """The corpus and every synthesis setting (all of them are in the config name)."""

    source: str = ""
    accent: str = "en-029"
    control_accent: str = "en-us"
    voices: tuple = ("m1", "m3", "m5", "f1", "f2", "f4")
    sizes: tuple = (("dev", 100), ("test", 100), ("dev_control", 100), ("test_control", 100),
                    ("train", 1000))
    seed: int = 0
    max_seconds: float = 10.0
    speeds: tuple = (145, 185)   # words a minute, inclusive range
    pitches: tuple = (30, 70)    # espeak-ng pitch 0..99, inclusive range
    workers: int = 2


def sentences(texts: Sequence[str], min_words: int = 4, max_words: int = 20) -> list[str]:
    """The unique plain sentences of `texts`, sorted (the first spelling of each is kept).

    Args:
      texts: snippets, each one or more sentences.
      min_words: shortest sentence kept.
      max_words: longest sentence kept.

    Returns:
      Sentences of ASCII letters and plain punctuation, deduplicated ignoring case and
      punctuation.
    """
    seen: dict[str, str] = {}
    for text in texts:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            if not _ALLOWED.fullmatch(sentence) or "--" in sentence:
                continue
            words = re.findall(r"[A-Za-z']+", sentence)
            if min_words <= len(words) <= max_words:
                seen.setdefault(" ".join(words).lower(), sentence)
    return sorted(seen.values())


def deal(pool: Sequence[str], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Shuffles `pool` with `random.Random(seed)` and deals it to the splits in SPLITS order.

    Args:
      pool: unique sentences.
      sizes: split -> number of sentences (0: the split is left out).
      seed: the shuffle seed.

    Returns:
      split -> its sentences (splits of size 0 absent).
    """
    need = sum(sizes.values())
    if need > len(pool):
        raise UserError(f"the accent demo needs {need} sentences, the corpus gives {len(pool)}; "
                        "lower data.speech.*_size")
    order = list(pool)
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for split in SPLITS:
        n = int(sizes.get(split, 0))
        if n:
            out[split], start = order[start:start + n], start + n
    return out


def ensure_espeak(run=subprocess.run, which=shutil.which) -> str:
    """The path of espeak-ng, installing the pinned Debian package first if it is missing.

    As root with apt-get: installs ESPEAK_PACKAGE (after `apt-get update` if the package
    lists lack it); on another distribution, where that version does not exist, its own
    espeak-ng (the version used is recorded in the dataset's metadata either way).

    Args:
      run: runs a command (subprocess.run; a test passes a recorder).
      which: finds a program on PATH (shutil.which).

    Returns:
      The espeak-ng executable.

    Raises:
      UserError: missing and not installable here (not root, or apt-get failed).
    """
    found = which(ESPEAK)
    if found:
        return found
    how = f"apt-get install -y --no-install-recommends {ESPEAK_PACKAGE}"
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not which("apt-get"):
        raise UserError(f"the accent_speech demo needs espeak-ng: install it (Debian/Ubuntu: sudo {how}; "
                        "macOS: brew install espeak-ng)")
    print(f"accent_speech: installing {ESPEAK_PACKAGE} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = how.split()
    result = run(install, env=env, capture_output=True)
    if result.returncode != 0:  # the package lists may be missing or stale on a fresh machine
        run(["apt-get", "update"], env=env, capture_output=True)
        result = run(install, env=env, capture_output=True)
    if result.returncode != 0:  # another distribution: its own version
        print(f"accent_speech: {ESPEAK_PACKAGE} is not available here; installing this system's espeak-ng",
              flush=True)
        result = run([*install[:-1], ESPEAK], env=env, capture_output=True)
    found = which(ESPEAK) if result.returncode == 0 else None
    if not found:
        tail = " ".join((result.stderr or b"").decode(errors="replace").split())[-200:]
        raise UserError(f"could not install espeak-ng ({how}: {tail or 'not on PATH afterwards'})")
    return found


def espeak_version(exe: str) -> str:
    """espeak-ng's version line ("eSpeak NG text-to-speech: 1.51 ...", data path dropped)."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("Data at:")[0].strip() or "unknown"


def synthesize(exe: str, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One sentence spoken by espeak-ng: float32 mono at 16 kHz.

    Args:
      exe: the espeak-ng executable.
      text: the sentence (read from stdin, so no text is taken for an option).
      voice: "LANG+VARIANT", e.g. "en-029+m3".
      speed: words a minute (-s).
      pitch: 0..99 (-p).
    """
    result = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout"],
                            input=text.encode(), capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        err = " ".join(result.stderr.decode(errors="replace").split())[:200]
        raise UserError(f"espeak-ng failed for voice {voice!r} ({err or 'no audio'}); check data.speech.accent "
                        "and data.speech.voices (espeak-ng --voices lists the languages)")
    return audio_lib.read_audio(result.stdout, max_seconds=None, name=f"espeak-ng output ({voice})")


def clip_settings(c: AccentSpeechConfig, split: str, index: int) -> tuple[str, int, int]:
    """(voice, speed, pitch) of clip `index` of `split`, a function of the seed only."""
    rng = np.random.default_rng([c.seed, SPLITS.index(split), index, 0xACC])
    accent = c.control_accent if split.endswith("_control") else c.accent
    voice = f"{accent}+{c.voices[int(rng.integers(len(c.voices)))]}"
    return voice, int(rng.integers(c.speeds[0], c.speeds[1] + 1)), int(rng.integers(c.pitches[0], c.pitches[1] + 1))


class AccentSpeech(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Rotten Tomatoes sentences in a target and a control espeak-ng accent."""

    name = "accent_speech"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(description=__doc__, features=speech_manifest.speech_features(),
                                              metadata=tfds.core.MetadataDict(sample_rate=audio_lib.SAMPLE_RATE))

    def _split_generators(self, dl_manager):
        del dl_manager  # a local corpus and a local synthesizer
        c = self.builder_config
        exe = ensure_espeak()
        self.info.metadata["espeak_ng"] = espeak_version(exe)
        pool = sentences([r["text"] for r in rotten_tomatoes.read_reviews(c.source)])
        dealt = deal(pool, dict(c.sizes), c.seed)
        return {split: self._generate_examples(exe, split, texts) for split, texts in dealt.items()}

    def _generate_examples(self, exe: str, split: str, texts: list[str]) -> Iterator[tuple[int, dict]]:
        c = self.builder_config

        def make(i: int):
            voice, speed, pitch = clip_settings(c, split, i)
            return voice, synthesize(exe, texts[i], voice, speed, pitch)

        # espeak-ng runs as a child process, so threads synthesize in parallel.
        kept = 0
        with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
            for i, (voice, clip) in enumerate(pool.map(make, range(len(texts)))):
                if clip.size > c.max_seconds * audio_lib.SAMPLE_RATE:
                    continue
                kept += 1
                yield i, {"id": f"{split}/{i}", "audio": audio_lib.to_int16(clip), "text": texts[i],
                          "speaker": voice}
        if texts and not kept:
            raise UserError(f"accent_speech: every one of the {len(texts)} {split} clips is longer than "
                            f"data.speech.max_seconds={c.max_seconds}; raise it")


def make_builder(source: str, data_dir: str, **settings) -> AccentSpeech:
    """Returns the builder for one setting; its config name is a digest of all of them.

    Args:
      source: path of the Rotten Tomatoes corpus (rotten_tomatoes_corpus_full.csv.bz2).
      data_dir: the TFDS data_dir.
      **settings: AccentSpeechConfig fields (accent, control_accent, voices, sizes,
        seed, max_seconds, speeds, pitches, workers).

    Returns:
      A builder; call `ftjax.data.builders.prepare(builder)` then `as_data_source`.
    """
    if not os.path.isfile(source):
        raise UserError(f"Rotten Tomatoes corpus {source} does not exist")
    c = AccentSpeechConfig(name="unnamed", source=os.path.abspath(source), **settings)
    _check(c)
    # Every setting that changes the audio or the splits (not `workers`), and the corpus.
    key = {k: getattr(c, k) for k in _SETTINGS}
    key["corpus"] = rotten_tomatoes._file_digest(source)
    name = "h" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    config = dataclasses.replace(c, name=name, version=AccentSpeech.VERSION, description=json.dumps(key))
    return AccentSpeech(config=config, data_dir=data_dir)


_SETTINGS = ("accent", "control_accent", "voices", "sizes", "seed", "max_seconds", "speeds", "pitches")


def _check(c: AccentSpeechConfig) -> None:
    def bad(key, why):
        raise UserError(f"data.speech.{key}={getattr(c, key, None)!r}: {why}")

    for key in ("accent", "control_accent"):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", getattr(c, key)):
            bad(key, "must be an espeak-ng language such as en-029, en-us, en-gb-scotland")
    if not c.voices or not all(re.fullmatch(r"[A-Za-z0-9_]+", v) for v in c.voices):
        bad("voices", "must be a non-empty tuple of espeak-ng variants such as m1, f2")
    for key, lo, hi in (("speeds", 80, 450), ("pitches", 0, 99)):
        a, b = getattr(c, key)
        if not lo <= a <= b <= hi:
            bad(key, f"must be (min, max) with {lo} <= min <= max <= {hi}")
    if c.max_seconds <= 0:
        bad("max_seconds", "must be positive")
    if any(n < 0 for _, n in c.sizes) or not dict(c.sizes).get("train") or not dict(c.sizes).get("dev"):
        raise UserError(f"split sizes {dict(c.sizes)}: train and dev must be positive, none negative")


def make_from_config(config, data_dir: str) -> AccentSpeech:
    """Builds from data.speech (accent, control_accent, voices, *_size, seed, ...) and the asset."""
    from ftjax import assets

    s = config.data.speech
    folder = assets.fetch("rotten_tomatoes")
    sizes = (("dev", int(s.dev_size)), ("test", int(s.test_size)), ("dev_control", int(s.control_size)),
             ("test_control", int(s.control_size)), ("train", int(s.train_size)))
    return make_builder(os.path.join(os.fspath(folder), rotten_tomatoes.SOURCE_FILE), data_dir,
                        accent=s.accent, control_accent=s.control_accent, voices=tuple(s.voices),
                        sizes=sizes, seed=int(s.seed), max_seconds=float(s.max_seconds),
                        speeds=tuple(map(int, s.speeds)), pitches=tuple(map(int, s.pitches)),
                        workers=int(s.workers))
