"""Tokenizer and grain pipeline: seeded per-epoch shuffle, exact resume, process
slices, complete eval passes, bucketing, and the TFDS catalog path (mocked)."""

import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from ftjax.data import pipeline, tfds_sources
from ftjax.data.tokenizer import load_tokenizer
from ftjax.errors import UserError
from tests.conftest import require_asset

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = [*DIGITS, "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "good", "bad",
         "film", "plot"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLS, SEP = 2, 3


def _text(i: int) -> str:
    """A unique text per example (its digits spelled out) of varying length."""
    return " ".join([DIGITS[int(c)] for c in str(i)] + ["the"] * (16 if i % 5 == 4 else i % 4))


def _row_ids(batch, row):
    return tuple(batch["input_ids"][row][batch["attention_mask"][row] == 1])


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return folder


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return load_tokenizer(vocab_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    for split, n in (("train", 40), ("dev", 37)):
        lines = ["text,label"] + [f"{_text(i)},{'pos' if i % 3 else 'neg'}" for i in range(n)]
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps({"a": _text(i), "b": _text(i + 1), "score": i / 4}) + "\n" for i in range(12))
    return root


def _config(files, **overrides):
    c = common.base_config()
    c.data.name = "local_text"
    c.data.data_dir = str(files / "tfds")
    c.data.files.train, c.data.files.dev = str(files / "train.csv"), str(files / "dev.csv")
    c.data.max_length = 16
    c.data.bucket_lengths = (4, 8, 12)
    c.batch_size, c.eval_batch_size = 8, 8
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c.lock()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- tokenizer ----------------------------------------------------------------


def test_tokenizer_from_vocab_truncates_keeping_special_tokens(tok):
    assert tok.pad_id == 0 and tok.vocab_size == len(SPECIAL + WORDS)
    [(ids, types)] = tok.encode(["The cat sat"], None, 16)
    assert ids == [CLS, 15, 16, 17, SEP] and types == [0] * 5
    [(ids, _)] = tok.encode(["the " * 30], None, 8)
    assert len(ids) == 8 and ids[0] == CLS and ids[-1] == SEP
    [(ids, types)] = tok.encode(["the " * 30], ["cat " * 2], 9)
    assert len(ids) == 9 and ids.count(SEP) == 2 and ids[-3:] == [16, 16, SEP]
    assert types == [0] * 6 + [1] * 3
    with pytest.raises(UserError, match="at least 3"):
        tok.encode(["a"], None, 2)


def test_tokenizer_json_padding_is_disabled(tok, tmp_path):
    backend = tok._backend
    backend.enable_padding(length=128)  # like all-MiniLM-L6-v2's tokenizer.json
    backend.save(str(tmp_path / "tokenizer.json"))
    backend.no_padding()
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(["the cat"], None, 64) == [([CLS, 15, 16, SEP], [0, 0, 0, 0])]
    clone = pickle.loads(pickle.dumps(loaded))  # grain workers get a copy
    assert clone.encode(["cat sat"], ["dog"], 64) == loaded.encode(["cat sat"], ["dog"], 64)


@pytest.mark.assets
def test_minilm_tokenizer_is_unpadded():
    tok = load_tokenizer(require_asset("minilm"))  # its tokenizer.json pads to 128
    assert (tok.pad_id, tok.vocab_size) == (0, 30522)
    assert tok.encode(["A man is eating food."], None, 128) == [
        ([101, 1037, 2158, 2003, 5983, 2833, 1012, 102], [0] * 8)]
    [(ids, types)] = tok.encode(["A man is eating food."], ["A man is eating a piece of bread."], 10)
    assert ids == [101, 1037, 2158, 2003, 102, 1037, 2158, 2003, 5983, 102] and sum(types) == 5


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="expected tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)


# ---- train order and resume ---------------------------------------------------------


def test_train_shuffle_is_seeded_and_differs_per_epoch(files, tok):
    data = pipeline.TextData(_config(files), tok)
    assert data.steps_per_epoch == 5 and data.label_names == ["neg", "pos"]
    batches = _take(data.train_batches(), 10)
    epochs = [[_row_ids(b, r) for b in batches[e * 5:(e + 1) * 5] for r in range(8)] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 40
    assert epochs[0] != epochs[1]
    again = _take(pipeline.TextData(_config(files), tok).train_batches(), 10)
    assert all(_same(a, b) for a, b in zip(batches, again))
    other = _take(pipeline.TextData(_config(files, seed=1), tok).train_batches(), 5)
    assert [_row_ids(b, 0) for b in other] != [_row_ids(b, 0) for b in batches[:5]]


def test_epoch_order_window_shuffle():
    full = pipeline.epoch_order(100, 0, 0)
    assert sorted(full) == list(range(100)) and not np.array_equal(full, pipeline.epoch_order(100, 0, 1))
    windowed = pipeline.epoch_order(100, 0, 0, window=10)
    assert sorted(windowed) == list(range(100))
    assert all(len(set(windowed[i:i + 10] // 10)) == 1 for i in range(0, 100, 10))


def test_train_batches_resume_exactly(files, tok):
    data = pipeline.TextData(_config(files), tok)
    fresh = _take(data.train_batches(), 13)
    for k in (1, 4, 5, 12):
        assert _same(next(data.train_batches(start_step=k)), fresh[k])


def test_process_slices_concatenate_to_the_global_batch(files, tok):
    whole = pipeline.TextData(_config(files), tok)
    parts = [pipeline.TextData(_config(files), tok, process_index=i, process_count=2) for i in range(2)]
    for full, *halves in zip(_take(whole.train_batches(), 6), *[_take(p.train_batches(), 6) for p in parts]):
        assert all(h["input_ids"].shape == (4, full["input_ids"].shape[1]) for h in halves)
        for key in full:
            assert np.array_equal(np.concatenate([h[key] for h in halves]), full[key])
    for full, *halves in zip(whole.eval_batches("dev"), *[p.eval_batches("dev") for p in parts]):
        for key in full:
            assert np.array_equal(np.concatenate([h[key] for h in halves]), full[key])
    with pytest.raises(UserError, match="multiple of the process count 3"):
        pipeline.TextData(_config(files), tok, process_index=0, process_count=3)


# ---- eval, buckets, labels -------------------------------------------------------------


def test_eval_covers_every_example_once(files, tok):
    data = pipeline.TextData(_config(files), tok)
    batches = list(data.eval_batches("dev"))
    assert len(batches) == data.num_eval_batches("dev") == 5 and data.num_examples("dev") == 37
    assert all(b["input_ids"].shape[0] == 8 and b["mask"].dtype == np.float32 for b in batches)
    assert sum(b["mask"].sum() for b in batches) == 37
    seen = [_row_ids(b, r) for b in batches for r in range(8) if b["mask"][r]]
    expected = [tuple(ids) for ids, _ in tok.encode([_text(i) for i in range(37)], None, 16)]
    assert sorted(seen) == sorted(expected)
    assert not data.has_split("test")
    limited = pipeline.TextData(_config(files, data__eval_limit=10), tok)
    assert sum(b["mask"].sum() for b in limited.eval_batches("dev")) == 10


def test_buckets_and_truncation(files, tok):
    assert pipeline.bucket_lengths((32, 8, 64, 256), 64) == [8, 32, 64]
    assert [pipeline.pick_length(n, [8, 32, 64]) for n in (1, 8, 9, 64, 99)] == [8, 8, 32, 64, 64]
    data = pipeline.TextData(_config(files), tok)
    lengths = set()
    for b in _take(data.train_batches(), 10) + list(data.eval_batches("dev")):
        longest = int(b["attention_mask"].sum(1).max())
        assert b["input_ids"].shape[1] == pipeline.pick_length(longest, [4, 8, 12, 16])
        lengths.add(b["input_ids"].shape[1])
        full = b["attention_mask"].sum(1) == 16  # truncated rows still end with [SEP]
        assert (b["input_ids"][full, -1] == SEP).all() and (b["input_ids"][:, 0] == CLS).all()
    assert 16 in lengths and len(lengths) > 1


def test_pairs_regression_and_limits(files, tok):
    pairs = str(files / "pairs.jsonl")
    c = _config(files, data__files__train=pairs, data__files__dev=pairs, data__text_column="a",
                data__text_pair_column="b", data__label_column="score",
                data__regression=True, data__train_limit=8, batch_size=4)
    data = pipeline.TextData(c, tok)
    assert (data.num_labels, data.label_names, data.text_keys) == (1, [], ("text", "text_pair"))
    assert data.num_examples("train") == 8 and data.steps_per_epoch == 2
    b = next(data.train_batches())
    assert b["label"].dtype == np.float32 and b["token_type_ids"].max() == 1
    labels = {float(v) for b in _take(data.train_batches(), 8) for v in b["label"]}
    assert len(labels) == 8  # only the first 8 examples, all of them


def test_label_out_of_range_names_split_and_example(files, tok, monkeypatch):
    rows = [{"sentence": b"the cat", "label": np.int64(i % 2)} for i in range(16)]
    rows[11]["label"] = np.int64(2)
    sources = tfds_sources.Sources(name="fake", splits={"train": rows, "dev": rows},
                                   split_names={"train": "train", "dev": "validation"},
                                   text_keys=("sentence",), label_key="label",
                                   label_names=["a", "b"], regression=False)
    monkeypatch.setattr(tfds_sources, "load_sources", lambda config, labels=True: sources)
    data = pipeline.TextData(_config(files), tok)
    with pytest.raises(UserError, match=r"split 'validation': example 11 has label 2, outside \[0, 2\)"):
        list(data.eval_batches("dev"))


def test_missing_dev_split(files, tok):
    with pytest.raises(UserError, match="no dev split: set data.files.dev"):
        pipeline.TextData(_config(files, data__files__dev=None), tok)


def test_worker_processes_give_the_same_batches(files, tok):
    data = pipeline.TextData(_config(files), tok)
    workers = pipeline.TextData(_config(files, data__num_workers=1), tok)
    it = workers.train_batches(start_step=3)
    try:
        assert all(_same(a, b) for a, b in zip(_take(it, 3), _take(data.train_batches(3), 3)))
    finally:
        it.close()


# ---- TFDS catalog (mocked: no download) ---------------------------------------------


@pytest.mark.parametrize("name,key,dev", [("glue/sst2", "sentence", "validation"),
                                          ("imdb_reviews", "text", "test")])
def test_catalog_datasets_through_mock_data(files, tok, name, key, dev):
    c = _config(files, data__name=name, data__text_keys=(key,), data__dev_split=dev)
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        data = pipeline.TextData(c, tok)
        assert data.num_labels == 2 and data.num_examples("dev") == 20 and data.steps_per_epoch == 2
        b = next(data.train_batches())
        assert b["input_ids"].shape[0] == 8 and set(b["label"]) <= {0, 1}
        assert sum(e["mask"].sum() for e in data.eval_batches("dev")) == 20
    bad = _config(files, data__name=name, data__text_keys=("nope",))
    with (tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE),
          pytest.raises(UserError, match=f"'nope' is not a feature of {name}")):
        pipeline.TextData(bad, tok)


def test_unknown_split_lists_the_splits(files, tok, monkeypatch, tmp_path):
    from ftjax.data.builders import rotten_tomatoes
    from tests.test_builders import _write_corpus

    corpus = str(tmp_path / rotten_tomatoes.SOURCE_FILE)
    _write_corpus(corpus)
    monkeypatch.setattr(rotten_tomatoes, "make_from_config",  # instead of the pinned asset
                        lambda config, data_dir: rotten_tomatoes.make_builder(corpus, data_dir))
    c = _config(files, data__name="rotten_tomatoes", data__text_keys=("text",),
                data__data_dir=str(tmp_path / "tfds"))  # dev_split is still "validation"
    with pytest.raises(UserError, match=r"data.dev_split='validation' is not a split of "
                                        r"rotten_tomatoes; splits: \w+, \w+, \w+$"):
        pipeline.TextData(c, tok)
    c = _config(files, data__name="rotten_tomatoes", data__text_keys=("text",), data__dev_split="dev",
                data__test_split="test", data__data_dir=str(tmp_path / "tfds"))
    data = pipeline.TextData(c, tok)
    assert data.label_names == ["rotten", "fresh"] and data.has_split("test")
    assert sum(data.num_examples(s) for s in ("train", "dev", "test")) == 180
