"""Text classification (or regression) from local CSV / TSV / JSONL files.

The format comes from the extension: .csv (comma, quoted fields may span lines),
.tsv (tab, no quoting, as in the GLUE files), .jsonl / .json (one object per line).
Each split is one file (`data.files.{train,dev,test}`), with a header row for
CSV/TSV. The prepared dataset has the features `text`, optionally `text_pair`, and
`label` (a ClassLabel, or float32 for regression), whatever the column names were.

The builder's config name is a digest of the files' contents and of every column
setting, so editing a file or a setting prepares a fresh copy instead of reading a
stale one. Every bad row is a UserError naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ftjax.errors import UserError, one_line

ROLES = ("train", "dev", "test")
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """The files (role -> path) and how to read them."""

    files: dict = dataclasses.field(default_factory=dict)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple = ()
    regression: bool = False


def file_format(path: str) -> str:
    """Returns "csv", "tsv" or "jsonl" from the file extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise UserError(f"{path}: unknown file type {ext or '(none)'}; use .csv, .tsv or .jsonl")
    return _FORMATS[ext]


def _label_str(value) -> str:
    """A JSON label as the string a CSV would hold (1 -> "1", true -> "true")."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def read_records(path: str, columns: Sequence[tuple[str, str]] = ()
                 ) -> Iterator[tuple[int, dict]]:
    """Yields (line, record) for each row of a CSV / TSV / JSONL file.

    CSV/TSV records map header names to strings. JSON records are the parsed objects.

    Args:
      path: the file.
      columns: (column, its config key) pairs every record must have; checked on
        the header (line 1) of CSV/TSV files and on each JSON line.

    Yields:
      (1-based line number where the row starts, record dict).
    """
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist")
    fmt = file_format(path)
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the header
        yield from _records(path, fmt, columns)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _records(path: str, fmt: str, columns: Sequence[tuple[str, str]]) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig", newline="" if fmt != "jsonl" else None) as f:
        if fmt == "jsonl":
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line}: malformed JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # a 5000-digit number; arrays nested 1000 deep
                    reason = "nested too deep" if isinstance(e, RecursionError) else one_line(e)[:100]
                    raise UserError(f"{path}:{line}: malformed JSON ({reason})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
                _check_columns(path, line, record, columns)
                yield line, record
            return
        # TSV files (GLUE) contain unbalanced quotes: read them without quoting.
        reader = (csv.reader(f) if fmt == "csv"
                  else csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        try:
            header = next(reader, None)
            if not header:
                raise UserError(f"{path}:1: empty file; expected a header row")
            _check_columns(path, 1, header, columns)
            line = reader.line_num + 1
            for fields in reader:
                start, line = line, reader.line_num + 1  # a quoted field may span lines
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise UserError(f"{path}:{start}: {len(fields)} fields, the header has {len(header)}")
                yield start, dict(zip(header, fields))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({one_line(e)})") from None


def _not_utf8(path: str) -> UserError:
    """The error for a file that is not UTF-8: its first bad byte, with its offset and line."""
    with open(path, "rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            return UserError(f"{path}:1: the file is UTF-16 text, not UTF-8; re-save it as UTF-8 "
                             "(in Excel: Save As > CSV UTF-8)")
        f.seek(0)
        pending, offset, line = b"", 0, 1  # offset and line of the start of `pending`
        for block in iter(lambda: f.read(1 << 20), b""):
            data = pending + block
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as e:
                if e.end < len(data) or e.reason != "unexpected end of data":
                    bad = e.start
                    line += data.count(b"\n", 0, bad)
                    return UserError(f"{path}:{line}: not UTF-8 text (byte {offset + bad}, 0x{data[bad]:02x}); "
                                     "re-save the file as UTF-8 (in Excel: Save As > CSV UTF-8)")
                good = e.start  # a character cut by the block boundary: decoded with the next block
            line += data.count(b"\n", 0, good)
            pending, offset = data[good:], offset + good
    return UserError(f"{path}:{line}: not UTF-8 text (it ends inside a character, byte {offset}); "
                     "re-save the file as UTF-8")


def _check_columns(path: str, line: int, names, columns: Sequence[tuple[str, str]]) -> None:
    for column, key in columns:
        if column not in names:
            raise UserError(f"{path}:{line}: no column {column!r} (data.{key}); "
                            f"available: {one_line(', '.join(map(str, names)))[:300]}")


def _text(path: str, line: int, record: dict, column: str) -> str:
    value = record[column]
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}:{line}: empty text in column {column!r}")
    return value


def _label(path: str, line: int, record: dict, column: str):
    """The label cell; an empty one is an error, not a class of its own."""
    value = record[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{path}:{line}: empty label in column {column!r}; fill it in or remove the row")
    return value


def read_examples(path: str, c: LocalTextConfig) -> Iterator[tuple[int, dict]]:
    """Yields (line, example) with validated `text`, `text_pair` and `label` fields.

    Args:
      path: the file.
      c: the column settings; `label_names` must be set unless `regression`.

    Yields:
      (line, {"text", ["text_pair"], "label"}) with the label as a class index or float.
    """
    index = {name: i for i, name in enumerate(c.label_names)}
    columns = [(c.text_column, "text_column"), (c.label_column, "label_column")]
    if c.text_pair_column:
        columns.append((c.text_pair_column, "text_pair_column"))
    for line, record in read_records(path, columns):
        ex = {"text": _text(path, line, record, c.text_column)}
        if c.text_pair_column:
            ex["text_pair"] = _text(path, line, record, c.text_pair_column)
        raw = _label(path, line, record, c.label_column)
        if c.regression:
            try:
                value = float(raw)
            except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer of 400 digits
                value = math.nan
            if isinstance(raw, bool) or not math.isfinite(value):
                raise UserError(f"{path}:{line}: regression label {one_line(repr(raw))[:100]} is not a "
                                "finite number")
            ex["label"] = value
        else:
            label = _label_str(raw)
            if label not in index:
                raise UserError(f"{path}:{line}: label {label[:100]!r} is not one of the label names "
                                f"{one_line(', '.join(c.label_names))[:300]} (data.label_names)")
            ex["label"] = index[label]
        yield line, ex


def infer_label_names(path: str, label_column: str) -> tuple[str, ...]:
    """Sorted unique labels of a file; numerically sorted when all are integers."""
    labels = {_label_str(_label(path, line, r, label_column))
              for line, r in read_records(path, [(label_column, "label_column")])}
    if not labels:
        raise UserError(f"{path}: no rows, so no label names to infer; set data.label_names")
    try:
        return tuple(sorted(labels, key=int))  # "10" after "9", not after "1"
    except ValueError:
        return tuple(sorted(labels))


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local CSV / TSV / JSONL text classification or regression files."""

    name = "local_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        features = {"text": tfds.features.Text()}
        if c.text_pair_column:
            features["text_pair"] = tfds.features.Text()
        features["label"] = (tfds.features.Scalar(dtype=np.float32) if c.regression
                             else tfds.features.ClassLabel(names=list(c.label_names)))
        return self.dataset_info_from_configs(
            description=__doc__, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {role: self._generate_examples(path)
                for role, path in self.builder_config.files.items()}

    def _generate_examples(self, path: str):
        yield from read_examples(path, self.builder_config)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def role_files(files: dict[str, str | None], no_train: str, what: str) -> dict[str, str]:
    """Role -> absolute path of the set data.files.* entries, each an existing CSV/TSV/JSONL file.

    Args:
      files: role -> path or None.
      no_train: the error line when there is no train file.
      what: what a file is called in the missing-file error ("data file", "manifest").
    """
    unknown = set(files) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown split roles {sorted(unknown)}")
    files = {r: os.path.abspath(os.path.expanduser(p)) for r, p in files.items() if p}
    if "train" not in files:
        raise UserError(no_train)
    for path in files.values():
        if not os.path.isfile(path):
            raise UserError(f"{what} {path} does not exist")
        file_format(path)
    return files


def make_builder(files: dict[str, str | None], data_dir: str, *, text_column: str = "text",
                 text_pair_column: str | None = None, label_column: str = "label",
                 label_names: Sequence[str] | None = None, regression: bool = False) -> LocalText:
    """Returns the builder for these files and settings (label names inferred if None).

    Args:
      files: role ("train", "dev", "test") -> path, or None for an absent split.
      data_dir: the TFDS data_dir.
      text_column: column of the text.
      text_pair_column: column of the second text, or None.
      label_column: column of the label.
      label_names: class names in index order; None: sorted unique labels of train.
      regression: float labels instead of classes.

    Returns:
      A builder; call `ftjax.data.builders.prepare(builder)` then `as_data_source`.
    """
    files = role_files(files, "data.name=local_text needs data.files.train (a .csv, .tsv or .jsonl file)",
                       "data file")
    if regression:
        label_names = ()
    elif label_names is None:
        label_names = infer_label_names(files["train"], label_column)
    else:
        label_names = tuple(str(n) for n in label_names)
        if len(set(label_names)) != len(label_names) or not label_names:
            raise UserError(f"data.label_names {label_names} must be non-empty and unique")
    # Contents, not paths: an edited file gets a new name; a moved one is reused.
    key = {"files": {r: _digest(p) for r, p in sorted(files.items())},
           "columns": [text_column, text_pair_column, label_column],
           "label_names": list(label_names), "regression": bool(regression)}
    name = "h" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    config = LocalTextConfig(
        name=name, version=LocalText.VERSION, files=files, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column,
        label_names=tuple(label_names), regression=bool(regression),
        description=json.dumps({"files": files, **{k: v for k, v in key.items() if k != "files"}}))
    return LocalText(config=config, data_dir=data_dir)


def make_from_config(config, data_dir: str) -> LocalText:
    """Builds from `config.data.files` and the column settings."""
    d = config.data
    return make_builder(
        {"train": d.files.train, "dev": d.files.dev, "test": d.files.test}, data_dir,
        text_column=d.text_column, text_pair_column=d.text_pair_column,
        label_column=d.label_column,
        label_names=None if d.label_names is None else tuple(d.label_names),
        regression=d.regression)
