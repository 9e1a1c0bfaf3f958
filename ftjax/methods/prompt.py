"""Prompt tuning (Lester et al. 2021): n soft token vectors before the input embeddings.

Only the prompt (and the task head) trains. The prompt starts as the embeddings of
random vocabulary tokens (`prompt_init="vocab"`, the paper's better init), of a text's
tokens (`prompt_init="text"` with `prompt_init_text`), or random normal ("random").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.models.layers import Peft
from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


ADDS = (r".*/prompt",)  # parameters this method adds (pretrained weights lack them)
NEEDS = ("attention",)  # encoder features it builds on (FamilySpec.provides)


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return head_and(*ADDS)


def peft(args) -> Peft:
    if args.prompt_tokens < 1:
        raise UserError(f"method_args.prompt_tokens={args.prompt_tokens} must be >= 1")
    return Peft(prompt_tokens=int(args.prompt_tokens))


def post_load(params: Any, args, tokenizer, seed: int) -> dict:
    """Initialises the prompt from the (pretrained) word embeddings."""
    if args.prompt_init == "random":
        return params
    flat = dict(tree_lib.flatten(params))
    prompt_path = next(p for p in flat if p.endswith("/prompt"))
    vocab = [p for p in flat if p.endswith("word_embeddings/embedding")]
    if not vocab:  # an image encoder (VPT): no vocabulary to draw from
        if args.prompt_init == "text":
            raise UserError("method_args.prompt_init=text needs a text model; image models start "
                            "their prompts at random (prompt_init=random or vocab)")
        return params
    words = np.asarray(flat[vocab[0]])
    n = flat[prompt_path].shape[0]
    if args.prompt_init == "vocab":
        # Skip the low ids where BERT vocabularies keep [PAD], [unused*] and specials.
        low = min(1000, words.shape[0] // 2)
        ids = np.random.default_rng(seed).integers(low, words.shape[0], n)
    elif args.prompt_init == "text":
        if not args.prompt_init_text:
            raise UserError("method_args.prompt_init=text needs method_args.prompt_init_text")
        tokens = tokenizer.content_ids(args.prompt_init_text)[:n]  # no [CLS]/[SEP] or BOS
        if not tokens:
            raise UserError(f"method_args.prompt_init_text={args.prompt_init_text!r} has no tokens")
        ids = np.resize(np.asarray(tokens, np.int64), n)
    else:
        raise UserError(f"method_args.prompt_init={args.prompt_init!r} is not vocab, text or random")
    flat[prompt_path] = words[ids].astype(np.float32)
    return tree_lib.unflatten(flat)
