"""The causal_lm task end to end on a tiny Llama: prompt-masked batches, generation metrics, resume, predict, export."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import smollm_headlines
from ftjax import train
from ftjax.data import causal
from ftjax.errors import UserError
from ftjax.tasks.causal_lm import METRICS
from tests import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "cat", "dog", "fish", "one", "two", "three", "say", "please", "copy"]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <end> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def write_tokenizer(folder: pathlib.Path, chat: bool = True) -> pathlib.Path:
    """A word-level tokenizer over WORDS with <pad>/<bos>/<end> and role tokens (and a chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<bos>", "<end>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<end>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    if chat:
        config["chat_template"] = CHAT
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_rows(path: pathlib.Path, n: int, seed: int) -> pathlib.Path:
    """A copy task: "say A B" -> "A B"."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = rng.choice(WORDS[:9], size=int(rng.integers(1, 4))).tolist()
        rows.append({"prompt": "say " + " ".join(words), "response": " ".join(words)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    return {"tok": write_tokenizer(root / "tok"), "train": write_rows(root / "train.jsonl", 48, 0),
            "dev": write_rows(root / "dev.jsonl", 8, 1), "root": root}


def _config(s, **overrides):
    c = smollm_headlines.get_config("runlocal")
    with c.unlocked():
        c.update_from_flattened_dict({
            "model.pretrained": None, "model.family": "llama", "model.variant": "tiny",
            "model.tokenizer": str(s["tok"]), "data.name": "local_prompts", "data.data_dir": str(s["root"] / "tfds"),
            "data.files.train": str(s["train"]), "data.files.dev": str(s["dev"]), "data.test_split": None,
            "data.prompt_template": "{prompt}", "data.response_key": "response", "data.truncate_key": None,
            "data.truncate_tokens": None, "data.max_length": 16, "data.bucket_lengths": (8, 16),
            "batch_size": 8, "eval_batch_size": 8, "eval_before_training": True, "progress_bar": False,
            "generation.max_new_tokens": 4, "optimizer.lr": 3e-3, **overrides})
    return c.lock()


@pytest.fixture(scope="module")
def trained(setting):
    work = setting["root"] / "w"
    return work, train.train_and_evaluate(_config(setting), str(work))


def _text(s, **kw) -> causal.ChatText:
    return causal.ChatText(str(s["tok"]), **kw)


def test_prompt_is_masked_and_the_response_ends_with_the_end_token(setting):
    t = _text(setting)
    ids, prompt_len, cut = causal.encode_example(t, {"prompt": "say red cat"}, "red cat", 32, "x")
    words = t.tok.convert_ids_to_tokens(ids)
    assert words == ["<|user|>", "say", "red", "cat", "<end>", "<|assistant|>", "red", "cat", "<end>"]
    assert prompt_len == 6 and not cut
    b = causal.pad_batch([(ids, prompt_len)], 12, 2, t.pad_id)
    assert b["label_mask"][0].tolist() == [0] * 5 + [1] * 3 + [0] * 4  # predicts "red", "cat", "<end>"
    assert b["labels"][0, 5:8].tolist() == ids[6:9] and b["attention_mask"][1].sum() == 0
    p = causal.pad_prompts([ids[:prompt_len], ids[:2]], 8, 2, t.pad_id)
    assert p["prompt_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [0] * 6 + [1, 1]]  # left-padded
    plain = _text(setting, chat_template=False)
    assert plain.encode_prompt("say red") == [1, 16, 7]  # BOS + words, no template
    _, _, cut = causal.encode_example(t, {"prompt": "say red cat"}, "red cat blue blue", 9, "x")
    assert cut


def test_truncation_bad_rows_and_templates_are_one_line(setting):
    t = _text(setting, prompt_template="copy {body}", truncate_key="body", truncate_tokens=2)
    assert t.prompt_text({"body": "red green blue"}) == "copy red green ..."
    with pytest.raises(UserError, match="x: empty response"):
        causal.encode_example(t, {"body": "red"}, "  ", 32, "x")
    with pytest.raises(UserError, match="prompt is 6 tokens, longer than the context"):
        causal.encode_example(_text(setting), {"prompt": "say red cat"}, "red", 6, "x")
    with pytest.raises(UserError, match="must name its fields"):
        _text(setting, prompt_template="no fields")
    with pytest.raises(UserError, match="needs data.truncate_tokens"):
        _text(setting, truncate_key="prompt")


def test_local_prompts_rows_are_checked(setting, tmp_path):
    from ftjax.data.builders import local_prompts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "say red", "response": "red"}\n{"prompt": "say cat", "response": ""}\n')
    config = local_prompts.make_builder({"train": str(bad)}, str(tmp_path / "tfds"), prompt_template="{prompt}",
                                        response_key="response").builder_config
    with pytest.raises(UserError, match=r"bad.jsonl:2: empty response in column 'response'"):
        list(local_prompts.read_examples(str(bad), config))
    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "say red", "response": "red"}\n')
    with pytest.raises(UserError, match=r"other.jsonl:1: no column 'prompt'"):
        list(local_prompts.read_examples(str(other), config))


def test_training_scores_generation_before_and_after(trained, setting):
    work, summary = trained
    assert summary["final_step"] == 4 and summary["start"] == "scratch"
    for when in (summary["dev"], summary["before"]["dev"]):
        assert set(when) == set(METRICS)
        assert when["num_examples"] == 4 and 0 <= when["rougeL"] <= 1 and when["perplexity"] > 1
    samples = json.loads((work / "samples" / "dev_final.json").read_text())
    assert len(samples) == 4 and samples[0]["prompt"].startswith("<|user|> say ")
    responses = [json.loads(line)["response"] for line in setting["dev"].read_text().splitlines()]
    assert all(s["reference"] in responses for s in samples)
    assert (work / "samples" / "dev_before.json").is_file()
    # the loss saw response tokens only: token accuracy is over <= 4 targets a row, never the prompt
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("train/token_accuracy" in r for r in rows)


def test_a_run_cut_after_a_checkpoint_continues_bitwise(trained, setting, tmp_path):
    work0, summary0 = trained
    work = tmp_path / "w"
    shutil.copytree(work0, work)
    # what a kill after the step-2 checkpoint leaves: later checkpoints and best entries, export,
    # samples and summary gone
    for p in [*(work / "checkpoints").iterdir(), *(work / "best").iterdir()]:
        if p.name.isdigit() and int(p.name) > 2:
            shutil.rmtree(p)
    for name in ("export", "samples"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "summary.json").unlink()
    summary = train.train_and_evaluate(_config(setting), str(work))
    assert summary["start"].startswith("resumed from") and summary["final_step"] == 4
    assert conftest.logged_losses(work) == conftest.logged_losses(work0)
    assert summary["dev"] == summary0["dev"] and summary["before"] == summary0["before"]


def test_predict_cli_generates_and_hf_export_is_a_llama_lm(trained, tmp_path):
    from safetensors.numpy import load_file

    from ftjax import export
    from ftjax.inference import Predictor

    work, _ = trained
    out = Predictor(str(work))(["say red", "say blue dog"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    sampled = Predictor(str(work), generation={"temperature": 1.0, "top_p": 0.9, "seed": 3})(["say red"])
    assert isinstance(sampled[0], str)
    r = subprocess.run([sys.executable, "-m", "ftjax.predict", f"--workdir={work}", "--beams=2", "say red"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip("\n").endswith("\tsay red")
    folder = export.export_hf(str(work), str(tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 4 and generation["eos_token_id"] == 2  # "<end>"
    tensors = load_file(str(folder / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and not any("lora" in k for k in tensors)
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("method, extra", [("prefix", {"method_args.prefix_tokens": 3}),
                                           ("ia3", {})])
def test_other_methods_train_generate_and_export(setting, tmp_path, method, extra):
    from ftjax.inference import Predictor

    config = _config(setting, **{"method": method, "total_steps": 2, "eval_every_steps": 2,
                                 "checkpoint_every_steps": 2, "eval_before_training": False, **extra})
    summary = train.train_and_evaluate(config, str(tmp_path / "w"))
    assert summary["method"] == method and 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["dev"]["num_examples"] == 4 and summary["dev"]["gen_tokens"] > 0
    out = Predictor(str(tmp_path / "w"))(["say red"])  # prefixes decode through the KV cache
    assert len(out) == 1 and isinstance(out[0], str)
