"""Text generation with a decoder-only LM: prompt in, response out (`config.task="causal_lm"`).

Training is teacher-forced next-token cross-entropy on the response tokens only (the
prompt is masked out; ftjax/data/causal.py builds the batches). Evaluation runs on device:
the teacher-forced loss of the reference response (perplexity) and a generation from
the prompt alone (greedy, beam search or top-p sampling over the model's KV cache,
ftjax/decoding.py), scored on the host with ROUGE-1/2/L F1 (Google's `rouge-score`,
stemmed) and exact match against the reference. Metric names: rouge1, rouge2, rougeL,
exact_match, perplexity, token_loss, gen_tokens, num_examples; `config.metric` picks
the one for best-k (rougeL by default in the configs; perplexity is minimised).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import decoding, tasks
from ftjax.errors import UserError
from ftjax.tasks import Task

METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "perplexity", "token_loss", "gen_tokens", "num_examples")


class CausalLMModel(nn.Module):
    """The family's decoder LM under its name; `call` picks the method.

    `model.apply(v, input_ids, attention_mask, train=...)` gives logits [B, T, V];
    `call="init_cache" | "decode_step"` reaches the decoding methods.
    """

    family: str
    encoder_config: Any
    options: Any
    input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")

    def dummy_inputs(self):
        return [jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)]

    @nn.compact
    def __call__(self, *args, train: bool = False, call: str = "__call__"):
        from ftjax import models

        spec = models.family(self.family)
        inner = spec.encoder(self.encoder_config, self.options, spec.name)
        if call == "__call__":
            return inner(*args, train=train)
        return getattr(inner, call)(*args)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class GenerationMetrics:
    """ROUGE-1/2/L F1 (mean over examples), exact match, perplexity of the references."""

    def __init__(self, text, keep_samples: int = 5):
        from rouge_score import rouge_scorer

        self.text = text
        self.scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        self.scores = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "exact_match")}
        self.n, self.nll, self.tokens, self.gen_tokens = 0, 0.0, 0.0, 0
        self.keep_samples, self._samples = keep_samples, []

    def update(self, predictions: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
        keep = rows["mask"] > 0
        self.nll += float(np.asarray(predictions["nll"], np.float64)[keep].sum())
        self.tokens += float(np.asarray(predictions["count"], np.float64)[keep].sum())
        for r in np.flatnonzero(keep):
            tokens, labels, lmask = predictions["tokens"][r], rows["labels"][r], rows["label_mask"][r]
            hyp = self.text.decode(tokens)
            ref = self.text.decode(labels[lmask > 0])
            if len(self._samples) < self.keep_samples:
                prompt = rows["prompt_ids"][r][rows["prompt_mask"][r] > 0]
                self._samples.append({"index": int(rows["index"][r]), "reference": ref, "generated": hyp,
                                      "prompt": self.text.tok.decode(prompt, skip_special_tokens=False)})
            s = self.scorer.score(ref, hyp)
            for k in ("rouge1", "rouge2", "rougeL"):
                self.scores[k] += s[k].fmeasure
            self.scores["exact_match"] += float(_normalise(hyp) == _normalise(ref))
            eos = np.flatnonzero(np.asarray(tokens) == self.text.eos_id)
            self.gen_tokens += int(eos[0]) if eos.size else len(tokens)
            self.n += 1

    def samples(self) -> list[dict[str, Any]]:
        """The first examples of the pass (in eval order): prompt, reference, generated text."""
        return list(self._samples)

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        token_loss = self.nll / max(self.tokens, 1.0)
        return {**{k: v / n for k, v in self.scores.items()}, "token_loss": token_loss,
                "perplexity": float(np.exp(min(token_loss, 80.0))), "gen_tokens": self.gen_tokens / n,
                "num_examples": self.n}


class CausalLM(Task):
    """Prompt -> response with a decoder-only LM."""

    name = "causal_lm"
    eval_keys = ("labels", "label_mask", "prompt_ids", "prompt_mask", "index")
    predict_keys = ("input_ids", "attention_mask", "labels", "label_mask", "prompt_ids", "prompt_mask")

    def __init__(self, text, generation: dict[str, Any], data_meta: dict[str, Any]):
        self.text = text
        self.generation = dict(generation)
        self.data_meta = dict(data_meta)

    @staticmethod
    def _chat_text(folder, d):
        from ftjax.data.causal import ChatText

        return ChatText(folder, prompt_template=d["prompt_template"], chat_template=d["chat_template"],
                        system_prompt=d.get("system_prompt"), truncate_key=d.get("truncate_key"),
                        truncate_tokens=d.get("truncate_tokens"))

    @classmethod
    def load_data(cls, config, family, process_index, process_count):
        from ftjax.data import causal, tokenizer as tok_lib

        if family.modality != "text" or "causal_lm" not in family.provides:
            raise UserError(f"task causal_lm needs a decoder LM family (llama, gpt2); {family.name} is not one")
        folder = tok_lib.tokenizer_folder(config)
        if not (folder / "tokenizer.json").exists():
            from ftjax.convert import gguf

            weights = gguf.find_gguf(folder)
            if weights is not None:  # a GGUF carries its tokenizer: written out once, cached
                folder = type(folder)(gguf.materialize(weights))
        d = config.data
        text = cls._chat_text(folder, {"prompt_template": d.prompt_template, "chat_template": d.chat_template,
                                       "system_prompt": d.system_prompt, "truncate_key": d.truncate_key,
                                       "truncate_tokens": d.truncate_tokens})
        data = causal.CausalLMData(config, text, process_index, process_count)
        data.tokenizer_dir = folder
        data.tokenizer = tok_lib.load_tokenizer(folder)  # for the methods (prompt_init=text)
        return data

    @classmethod
    def from_config(cls, config, data):
        g = config.generation
        generation = {"beams": int(g.beams), "max_new_tokens": int(g.max_new_tokens),
                      "length_penalty": float(g.length_penalty), "temperature": float(g.temperature),
                      "top_p": float(g.top_p), "seed": int(config.seed)}
        if generation["beams"] < 1 or generation["max_new_tokens"] < 1:
            raise UserError(f"generation.beams={g.beams} and generation.max_new_tokens={g.max_new_tokens} "
                            "must be >= 1")
        if generation["temperature"] < 0 or not 0 < generation["top_p"] <= 1:
            raise UserError(f"generation.temperature={g.temperature} must be >= 0 and generation.top_p={g.top_p} "
                            "in (0, 1]")
        if generation["temperature"] > 0 and generation["beams"] > 1:
            raise UserError("generation.temperature > 0 samples; it does not combine with generation.beams > 1")
        return cls(data.text, generation, data.export_meta())

    @classmethod
    def from_meta(cls, meta):
        folder = os.path.join(meta["export_dir"], "tokenizer")
        return cls(cls._chat_text(folder, meta), meta["generation"],
                   {k: meta[k] for k in ("max_length", "response_key") if k in meta})

    def build_model(self, family_name, model_config, options):
        from ftjax import models

        cfg = models.family(family_name).config(model_config)
        limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        need = int(self.data_meta.get("max_length", 0)) + self.generation["max_new_tokens"]
        if limit and need > limit:
            raise UserError(f"data.max_length ({self.data_meta.get('max_length')}) + generation.max_new_tokens "
                            f"({self.generation['max_new_tokens']}) exceed the model's {limit} positions")
        return CausalLMModel(family_name, cfg, options)

    def loss(self, logits, batch):
        return tasks.masked_token_loss(logits, batch)

    def generate(self, model, variables, prompt_ids, prompt_mask, rng=None):
        """Tokens generated after each left-padded prompt: int32 [B, max_new_tokens]."""
        g = self.generation

        def run(call, *args):
            return model.apply(variables, *args, call=call)

        cache = run("init_cache", prompt_mask, prompt_ids.shape[1] + g["max_new_tokens"])
        step = lambda tokens, c, index: run("decode_step", tokens, c, index)  # noqa: E731
        kw = dict(max_new_tokens=g["max_new_tokens"], eos_id=self.text.eos_id)
        if g["temperature"] > 0:
            rng = jax.random.key(g["seed"]) if rng is None else rng
            return decoding.sample(step, cache, prompt_ids, rng, temperature=g["temperature"], top_p=g["top_p"],
                                   **kw)
        if g["beams"] > 1:
            return decoding.beam_search(step, cache, prompt_ids, beams=g["beams"],
                                        length_penalty=g["length_penalty"], **kw)
        return decoding.greedy(step, cache, prompt_ids, **kw)

    def predict(self, model, variables, batch):
        """{"tokens": int32 [B, max_new_tokens], "nll": float32 [B], "count": float32 [B]}."""
        logits = model.apply(variables, batch["input_ids"], batch["attention_mask"], train=False)
        weights = batch["label_mask"].astype(jnp.float32)
        token_loss = tasks.token_losses(logits, batch["labels"])
        tokens = self.generate(model, variables, batch["prompt_ids"], batch["prompt_mask"])
        return {"tokens": tokens, "nll": (token_loss * weights).sum(-1), "count": weights.sum(-1)}

    def evaluators(self):
        return [GenerationMetrics(self.text)]

    @classmethod
    def metric_names(cls):
        return METRICS

    def export_meta(self):
        return {"task": self.name, **self.data_meta, "generation": self.generation,
                "eos_token_id": self.text.eos_id, "pad_token_id": self.text.pad_id}

    @classmethod
    def hf_files(cls, meta):
        g = meta.get("generation", {})
        gen = {"max_new_tokens": g.get("max_new_tokens"), "num_beams": g.get("beams", 1),
               "do_sample": g.get("temperature", 0) > 0, "length_penalty": g.get("length_penalty", 1.0)}
        for key in ("eos_token_id", "pad_token_id"):  # generation stops where ftjax's does
            if meta.get(key) is not None:
                gen[key] = meta[key]
        if gen["do_sample"]:
            gen.update(temperature=g["temperature"], top_p=g["top_p"])
        return {"generation_config.json": gen}

    def fingerprint(self):
        return {"prompt_template": self.text.prompt_template, "response_key": self.data_meta.get("response_key")}

    def summary(self):
        return {"generation": self.generation}

    infer_keys = ("prompt_ids", "prompt_mask")

    def raw_batch(self, inputs):
        """Prompts for generation: each input fills the template's one field (e.g. the article
        body, truncated like the training data), or is the whole user turn when the template
        has several fields."""
        from ftjax.data.causal import pad_prompts
        from ftjax.data.pipeline import pick_length

        t, prompts = self.text, []
        for raw in inputs:
            user = t.prompt_text({t.fields[0]: raw}) if len(t.fields) == 1 else raw
            ids = t.encode_prompt(user)
            limit = int(self.data_meta.get("max_length", 0)) or len(ids)
            if len(ids) >= limit:
                raise UserError(f"a prompt of {len(ids)} tokens is longer than the context the model was trained "
                                f"for (data.max_length={limit} with room for a response)")
            prompts.append(ids)
        length = pick_length(max(len(p) for p in prompts), [1 << k for k in range(4, 16)])
        return pad_prompts(prompts, length, len(prompts), t.pad_id)

    def infer(self, model, variables, batch):
        return {"tokens": self.generate(model, variables, batch["prompt_ids"], batch["prompt_mask"])}

    def render(self, predictions):
        return [self.text.decode(t) for t in np.asarray(predictions["tokens"])]


TASK = CausalLM
