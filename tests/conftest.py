"""Test setup: CPU only, 8 fake devices, fast compiles, the assets switch, and shared helpers.

The helpers (`write_vocab`, `write_csv`, `tiny_config`) build the tiny BERT text
setting that train_test.py, test_bad_inputs.py and test_resilience.py run.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from configs import common

# Before jax is imported anywhere:
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)


def require_asset(name: str) -> str:
    """Returns the local folder of asset `name`, or skips (fails under FTJAX_REQUIRE_ASSETS=1)."""
    from ftjax import assets

    try:
        return str(assets.fetch(name))
    except assets.AssetError as e:
        if os.environ.get("FTJAX_REQUIRE_ASSETS") == "1":
            pytest.fail(f"asset {name!r} is required here (FTJAX_REQUIRE_ASSETS=1): {e}")
        pytest.skip(f"asset {name!r} cannot be fetched here: {e}")


WORDS = ["good", "great", "fine", "superb", "lovely", "fun", "bad", "awful", "dull", "boring", "poor", "sad",
         "the", "a", "movie", "film", "was", "is", "very", "not", "plot", "acting"]
POS, NEG = WORDS[:6], WORDS[6:12]


def write_vocab(folder: pathlib.Path) -> pathlib.Path:
    """Writes a BERT WordPiece tokenizer over WORDS into `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return folder


def write_csv(path: pathlib.Path, n: int, seed: int) -> pathlib.Path:
    """Writes `n` seeded text,label rows (pos/neg, told by POS or NEG words) to `path`."""
    rs = np.random.RandomState(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = int(rs.randint(2))
        words = rs.choice(POS if label else NEG, size=rs.randint(1, 4)).tolist()
        filler = rs.choice(WORDS[12:], size=rs.randint(1, 6)).tolist()
        lines.append(f"{' '.join(filler[:2] + words + filler[2:])},{'pos' if label else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(files, **overrides):
    """A locked config: a tiny BERT on `files` (write_vocab / write_csv outputs), 6 steps.

    `overrides` maps flattened keys ("data.max_length") to values.
    """
    c = common.base_config()
    c.model.family = "bert"
    c.model.variant = "tiny"
    c.model.tokenizer = str(files["vocab"])
    c.data.name = "local_text"
    c.data.data_dir = str(files["data_dir"])
    c.data.files.train, c.data.files.dev = str(files["train"]), str(files["dev"])
    c.data.files.test = str(files["test"])
    c.data.max_length = 16
    c.data.bucket_lengths = (8, 16)
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = 6
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.log_every_steps = 1
    c.optimizer.lr = 1e-3
    c.progress_bar = False
    c.update_from_flattened_dict(overrides)
    return c.lock()


def data_files(folder, train: int = 48, dev: int = 16, test: int = 16, vocab=None) -> dict:
    """The tiny text setting's files in `folder`: a WordPiece tokenizer folder (or `vocab`),
    train/dev/test CSVs of the given row counts (test 0: no test split) and a TFDS data dir."""
    folder = pathlib.Path(folder)
    files = {"vocab": vocab or write_vocab(folder / "tok"), "train": write_csv(folder / "train.csv", train, 0),
             "dev": write_csv(folder / "dev.csv", dev, 1), "data_dir": folder / "tfds", "root": folder}
    if test:
        files["test"] = write_csv(folder / "test.csv", test, 2)
    return files


def logged_losses(workdir) -> dict[int, float]:
    """step -> train loss of a run's metrics.jsonl; a step logged twice (a rerun after a
    kill) keeps its last value."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out
