"""SentencePiece (spm.model) tokenizer folders, as DeBERTa-v3 ships them, against transformers' own ids.

The fixture (tests/fixtures/make_deberta_v2_fixtures.py) trains a tiny SentencePiece
model with v3's special pieces ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3), writes v3's
tokenizer_config.json (no tokenizer class, no tokenizer.json) beside the tiny model's
config.json, and records what transformers' DebertaV2Tokenizer makes of some texts.
"""

import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest

from ftjax.data import tokenizer as tok_lib
from ftjax.errors import UserError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
FOLDER = FIXTURES / "deberta_v2_tiny_random"


@pytest.fixture(scope="module")
def expected():
    return json.loads(str(np.load(FIXTURES / "deberta_v2_tiny_random_outputs.npz")["tokenizer_expected"]))


def _check_ids(tok, expected):
    singles = tok.encode(expected["texts"], None, 64)
    assert [ids for ids, _ in singles] == expected["ids"]
    assert [types for _, types in singles] == expected["type_ids"]
    pairs = tok.encode([a for a, _ in expected["pairs"]], [b for _, b in expected["pairs"]], 64)
    assert [ids for ids, _ in pairs] == expected["pair_ids"]
    assert [types for _, types in pairs] == expected["pair_type_ids"]
    # truncation keeps [CLS] ... [SEP] ... [SEP] and trims the pair longest-first, as transformers does
    assert tok.encode([expected["pairs"][1][0]], [expected["pairs"][1][1]], 7)[0][0] == expected["truncated_pair_ids"]


def test_v3_folder_matches_transformers(expected):
    """config.json + spm.model + a tokenizer_config.json that names no class (microsoft/deberta-v3-*)."""
    tok = tok_lib.load_tokenizer(FOLDER)
    _check_ids(tok, expected)
    assert tok.pad_id == expected["pad_token_id"] == tok._backend.token_to_id("[PAD]")
    assert tok.vocab_size == expected["vocab_size"]
    assert any(3 in ids for ids in expected["ids"])  # the texts do reach [UNK]


def test_bare_and_class_naming_folders(expected, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(FOLDER / "spm.model", bare / "spm.model")
    _check_ids(tok_lib.load_tokenizer(bare), expected)  # spm.model alone: DeBERTa's file name
    named = tmp_path / "named"
    shutil.copytree(bare, named)
    (named / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer"}))
    _check_ids(tok_lib.load_tokenizer(named), expected)


def test_pickles_for_worker_processes(expected):
    tok = pickle.loads(pickle.dumps(tok_lib.load_tokenizer(FOLDER)))
    _check_ids(tok, expected)
    assert tok.pad_id == expected["pad_token_id"]


def test_missing_sentencepiece_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(tok_lib, "_importable", lambda module: module != "sentencepiece")
    with pytest.raises(UserError, match="pip install sentencepiece") as e:
        tok_lib.load_tokenizer(FOLDER)
    assert "\n" not in str(e.value)


def test_folder_without_a_tokenizer_names_what_it_expects(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="spm.model"):
        tok_lib.load_tokenizer(tmp_path)
