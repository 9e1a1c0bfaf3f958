"""Prompt -> response data (causal_lm) from local CSV / TSV / JSONL files.

One file per split (`data.files.{train,dev,test}`), read like local_text's files
(format by extension, a header row for CSV/TSV, every bad row one line naming file and
line). The prepared dataset keeps, as text features, the columns the task reads: the
fields of `data.prompt_template` and `data.response_key`. A row missing one of them, or
with an empty response, is bad input.

  {"instruction": "Summarise: ...", "output": "..."}    # data.prompt_template="{instruction}"
                                                         # data.response_key="output"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from collections.abc import Iterator
from typing import ClassVar

import tensorflow_datasets as tfds

from ftjax.data.builders import local_text
from ftjax.errors import UserError


@dataclasses.dataclass(eq=False)
class LocalPromptsConfig(tfds.core.BuilderConfig):
    """The files (role -> path) and the columns kept."""

    files: dict = dataclasses.field(default_factory=dict)
    columns: tuple = ()
    response: str = "response"


def template_fields(template: str) -> tuple[str, ...]:
    """The feature names a str.format template reads ("{title}: {body}" -> title, body)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(f"data.prompt_template={template!r} is not a valid format string: {e}") from None
    names = tuple(dict.fromkeys(f.split(".")[0].split("[")[0] for f in fields))
    if not names or "" in names:
        raise UserError(f"data.prompt_template={template!r} must name its fields ({{column}}), e.g. '{{prompt}}'")
    return names


def read_examples(path: str, c: LocalPromptsConfig) -> Iterator[tuple[int, dict]]:
    """Yields (line, {column: text}) with every kept column present and the response non-empty."""
    keys = [(col, "prompt_template") for col in c.columns if col != c.response] + [(c.response, "response_key")]
    for line, record in local_text.read_records(path, keys):
        ex = {}
        for col, _ in keys:
            value = record[col]
            if value is None:
                value = ""
            if not isinstance(value, str):
                value = json.dumps(value) if not isinstance(value, (int, float)) else str(value)
            ex[col] = value
        if not ex[c.response].strip():
            raise UserError(f"{path}:{line}: empty response in column {c.response!r} (data.response_key)")
        yield line, ex


class LocalPrompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local prompt/response files."""

    name = "local_prompts"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({col: tfds.features.Text() for col in self.builder_config.columns}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {role: self._generate_examples(path) for role, path in self.builder_config.files.items()}

    def _generate_examples(self, path: str):
        yield from read_examples(path, self.builder_config)


def make_builder(files: dict[str, str | None], data_dir: str, *, prompt_template: str,
                 response_key: str) -> LocalPrompts:
    """Returns the builder for these files and columns (its name digests contents and columns)."""
    files = local_text.role_files(files, "data.name=local_prompts needs data.files.train (a .csv, .tsv or .jsonl "
                                  "file)", "data file")
    columns = tuple(dict.fromkeys([*template_fields(prompt_template), response_key]))
    key = {"files": {r: local_text._digest(p) for r, p in sorted(files.items())}, "columns": list(columns),
           "response": response_key}
    name = "h" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    config = LocalPromptsConfig(name=name, version=LocalPrompts.VERSION, files=files, columns=columns,
                                response=response_key, description=json.dumps({"files": files, "columns": columns}))
    return LocalPrompts(config=config, data_dir=data_dir)


def make_from_config(config, data_dir: str) -> LocalPrompts:
    d = config.data
    return make_builder({"train": d.files.train, "dev": d.files.dev, "test": d.files.test}, data_dir,
                        prompt_template=d.prompt_template, response_key=d.response_key)
