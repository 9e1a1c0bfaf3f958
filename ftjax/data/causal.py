"""grain input pipeline for prompt -> response data (causal language models).

The same contract as ftjax/data/pipeline.py's TextData: every batch is a pure function
of (seed, step) or (split, eval batch index), so training resumes exactly at any step.

An example is a prompt (`data.prompt_template` filled with the example's text features,
wrapped in the tokenizer's chat template when `data.chat_template` and it has one) and
a response (the feature `data.response_key`). Its token sequence is

    ids = prompt_ids + response_ids + [eos]      (at most data.max_length ids)

and the model learns the response only (the prompt is masked out of the loss):

    input_ids = ids[:-1]   labels = ids[1:]   label_mask[j] = j + 1 >= len(prompt_ids)

right-padded (attention_mask 0) to the bucket of the batch's longest row. A response
that does not fit is cut (its end token lost; logged once a split); a prompt that leaves
no room for one response token is bad input (one line naming the example), as is an
empty response. Eval batches also carry the prompt alone, LEFT-padded (`prompt_ids`,
`prompt_mask`), for generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from ftjax.data.pipeline import SplitData, bucket_lengths, pick_length, to_str
from ftjax.errors import UserError

Batch = dict[str, np.ndarray]


class ChatText:
    """Prompts and responses to token ids with a transformers fast tokenizer.

    Picklable (grain workers get a copy): it keeps the tokenizer folder and reloads.
    """

    def __init__(self, folder: str, *, prompt_template: str = "{prompt}", chat_template: bool = True,
                 system_prompt: str | None = None, truncate_key: str | None = None,
                 truncate_tokens: int | None = None):
        self.folder = str(folder)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.truncate_key, self.truncate_tokens = truncate_key, truncate_tokens
        from ftjax.data.builders.local_prompts import template_fields

        self.fields = template_fields(prompt_template)
        if truncate_key is not None and (truncate_tokens is None or int(truncate_tokens) < 1):
            raise UserError(f"data.truncate_key={truncate_key!r} needs data.truncate_tokens >= 1")
        self._load()
        self.use_chat = bool(chat_template) and bool(getattr(self.tok, "chat_template", None))

    def _load(self) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(self.folder)
        except Exception as e:  # transformers raises many types for a broken folder
            raise UserError(f"tokenizer folder {self.folder} cannot be loaded: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        eos = self.tok.eos_token_id
        if eos is None:
            raise UserError(f"tokenizer {self.folder} has no end-of-sequence token")
        self.eos_id = int(eos)
        pad = self.tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.vocab_size = len(self.tok)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "tok"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def prompt_text(self, features: dict[str, str]) -> str:
        """The user turn of one example (truncating data.truncate_key first)."""
        values = dict(features)
        if self.truncate_key is not None:
            if self.truncate_key not in values:
                raise KeyError(self.truncate_key)
            ids = self.tok(values[self.truncate_key], add_special_tokens=False)["input_ids"]
            if len(ids) > int(self.truncate_tokens):
                values[self.truncate_key] = self.tok.decode(ids[:int(self.truncate_tokens)]).rstrip() + " ..."
        return self.prompt_template.format(**values)

    def encode_prompt(self, text: str) -> list[int]:
        """The prompt's ids: the chat template with its assistant header, or BOS (if any) + text."""
        if self.use_chat:
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
                [{"role": "user", "content": text}]
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(i) for i in ids]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        return ([int(bos)] if bos is not None else []) + [int(i) for i in ids]

    def encode_response(self, text: str) -> list[int]:
        """The response's ids and the end token."""
        return [int(i) for i in self.tok(text, add_special_tokens=False)["input_ids"]] + [self.eos_id]

    def decode(self, ids) -> str:
        """Generated ids up to the first end token, as text."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def meta(self) -> dict[str, Any]:
        return {"prompt_template": self.prompt_template, "chat_template": self.use_chat,
                "system_prompt": self.system_prompt, "truncate_key": self.truncate_key,
                "truncate_tokens": self.truncate_tokens}


def encode_example(text: ChatText, features: dict[str, str], response: str, max_length: int,
                   where: str) -> tuple[list[int], int, bool]:
    """(ids, prompt length, whether the response was cut) of one example; bad input raises."""
    if not response.strip():
        raise UserError(f"{where}: empty response (data.response_key); fill it in or remove the example")
    prompt = text.encode_prompt(text.prompt_text(features))
    if len(prompt) + 1 > max_length:
        raise UserError(f"{where}: the prompt is {len(prompt)} tokens, longer than the context "
                        f"(data.max_length={max_length} leaves no room for the response): "
                        "raise data.max_length or set data.truncate_key / data.truncate_tokens")
    ids = prompt + text.encode_response(response)
    cut = len(ids) > max_length
    return ids[:max_length], len(prompt), cut


def pad_batch(rows: list[tuple[list[int], int]], length: int, batch_rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Teacher-forcing arrays (int32 [b, length]): input_ids, attention_mask, labels, label_mask."""
    inputs = np.full((batch_rows, length), pad_id, np.int32)
    attention = np.zeros((batch_rows, length), np.int32)
    labels = np.zeros((batch_rows, length), np.int32)
    mask = np.zeros((batch_rows, length), np.int32)
    for r, (ids, prompt_len) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n], labels[r, :n], attention[r, :n] = ids[:-1], ids[1:], 1
        mask[r, prompt_len - 1:n] = 1  # position j predicts ids[j + 1]
    return {"input_ids": inputs, "attention_mask": attention, "labels": labels, "label_mask": mask}


def pad_prompts(prompts: list[list[int]], length: int, batch_rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded prompts for generation: prompt_ids, prompt_mask (int32 [b, length])."""
    ids = np.full((batch_rows, length), pad_id, np.int32)
    mask = np.zeros((batch_rows, length), np.int32)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):], mask[r, length - len(p):] = p, 1
    return {"prompt_ids": ids, "prompt_mask": mask}


class _Batcher:
    """Global batch indices -> this process's rows."""

    def __init__(self, data: CausalLMData, role: str, train: bool):
        s = data._sources
        self.source, self.split = s.splits[role], s.split_names[role]
        self.text, self.max_length, self.buckets = data.text, data._max_length, data._buckets
        self.response_key, self.train = data.response_key, train
        self.process_index, self.process_count = data._process_index, data._process_count
        self.wants_lengths = self.process_count > 1
        self._cut_logged = False

    def _encode(self, index: int, record: dict) -> tuple[list[int], int]:
        where = f"split {self.split!r} example {index}"
        try:
            features = {k: to_str(record[k]) for k in self.text.fields}
            response = to_str(record[self.response_key])
        except KeyError as e:
            raise UserError(f"{where}: no feature {e.args[0]!r} (data.prompt_template / data.response_key / "
                            f"data.truncate_key); the dataset has {', '.join(sorted(record))}") from None
        ids, prompt_len, cut = encode_example(self.text, features, response, self.max_length, where)
        if cut and not self._cut_logged:
            from ftjax.logs import info

            self._cut_logged = True
            info(f"split {self.split!r}: a response is cut to fit data.max_length={self.max_length} "
                 "(logged once a split)")
        return ids, prompt_len

    def lengths(self, n: int) -> np.ndarray:
        """Sequence lengths (len(ids) - 1) of examples 0..n-1."""
        return np.asarray([len(self._encode(i, self.source[i])[0]) - 1 for i in range(n)], np.int32)

    def __call__(self, indices: np.ndarray, mask: np.ndarray | None, *, step: int | None = None,
                 lengths: np.ndarray | None = None) -> Batch:
        del step
        b = len(indices) // self.process_count
        lo = self.process_index * b
        if lengths is None and self.process_count > 1:
            raise ValueError("several processes need the token lengths of all examples")
        mine = [int(i) for i in indices[lo:lo + b]]
        rows = [self._encode(i, self.source[i]) for i in mine]
        longest = (int(lengths[np.asarray(indices, np.int64)].max()) if lengths is not None
                   else max(len(ids) - 1 for ids, _ in rows))
        batch = pad_batch(rows, pick_length(longest, self.buckets), b, self.text.pad_id)
        if mask is not None:
            prompts = [ids[:p] for ids, p in rows]
            # every process pads prompts to the same length: the bucket of max_length bounds them all
            longest_prompt = max(len(p) for p in prompts) if self.process_count == 1 else self.max_length - 1
            batch.update(pad_prompts(prompts, pick_length(longest_prompt, self.buckets), b, self.text.pad_id))
            batch["mask"] = mask[lo:lo + b].astype(np.float32)
            batch["index"] = np.asarray(mine, np.int32)
        return batch


class CausalLMData(SplitData):
    """Train and eval batches of prompt -> response data.

    Batches (b = batch_size // process_count, L the batch's length): input_ids,
    attention_mask, labels, label_mask (int32 [b, L]); eval batches add prompt_ids,
    prompt_mask (int32 [b, P], left-padded), mask (float32 [b]) and index (int32 [b]).

    Attributes:
      text: the ChatText that encodes examples.
      response_key: the response feature.
      eval_splits: the evaluation roles present (dev, test).
      steps_per_epoch: full train batches per epoch.
    """

    def __init__(self, config, text: ChatText, process_index: int = 0, process_count: int = 1):
        d = config.data
        self._open(config, process_index, process_count, labels=False)
        for role in ("train", "dev"):
            if role not in self._sources.splits:
                raise UserError(f"dataset {d.name} has no {role} split: set "
                                + ("data.files." + role if d.name == "local_prompts" else f"data.{role}_split"))
        self.text = text
        self.response_key = str(d.response_key)
        self._max_length = int(d.max_length)
        if self._max_length < 2:
            raise UserError(f"data.max_length={d.max_length} must be at least 2")
        self._buckets = bucket_lengths(d.bucket_lengths, self._max_length)
        self._group = int(d.group_by_length)
        self._count(config)
        self.eval_splits: list[str] = [r for r in ("dev", "test") if r in self._sizes]

    def _iterate(self, ds: grain.MapDataset, num_workers: int) -> Iterator[Batch]:
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 if num_workers > 0 else 4)
        return self._iterate_with(ds, read, num_workers)

    def _batcher(self, role: str, train: bool) -> _Batcher:
        return _Batcher(self, role, train)

    def export_meta(self) -> dict[str, Any]:
        return {"max_length": self._max_length, "response_key": self.response_key, **self.text.meta()}
