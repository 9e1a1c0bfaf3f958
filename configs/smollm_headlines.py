r"""Headline generation: a decoder LM fine-tuned with LoRA to write a news article's headline.

  python -m ftjax.main --config=configs/smollm_headlines.py:demo --workdir=/tmp/headlines

The task `causal_lm` (ftjax/tasks/causal_lm.py): the prompt is an instruction and the
article's body, in the model's chat template; the response is the headline (the
article's first line). The loss covers the response only. Dev and test are scored by
generating a headline from the prompt alone (greedy, at most 24 new tokens) with
ROUGE-1/2/L F1 (rouge-score, stemmed), exact match and the reference's perplexity;
with `eval_before_training` the same prompt is scored zero-shot first (summary "before").

No arg: SmolLM2-135M-Instruct (HuggingFaceTB; the pinned offline GGUF asset, Q4_1
projections dequantized to float32) with LoRA rank 8 on every attention and MLP
projection (q, k, v, o, gate, up, down), AdamW lr 1e-3 with 10% warmup and linear decay,
batch 8, on the BBC News articles (pinned asset `bbc_news`, ftjax's seeded stratified
split: 1,781 train / 221 dev / 223 test), bodies cut to their first 96 tokens.

Args (combinable):
  demo      the 2-core CPU budget: 60 steps (480 articles), dev and test limited to
            their first 100 articles. Expected: dev ROUGE-L well above zero-shot
            (results/generation/).
  runlocal  a few steps on a handful of articles, for smoke tests.
  method=   lora (default), full, freeze, bitfit, ia3, prompt, prefix, where the family has
            what they need.
  model=    smollm2 (default: the offline asset), or an HF folder / hub name of a Llama or
            GPT-2 family model (e.g. HuggingFaceTB/SmolLM2-135M-Instruct, gpt2).
"""

from configs import common

LLAMA_LORA_TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
GPT2_LORA_TARGETS = r".*/(c_attn|c_proj|c_fc)"
METHOD_LR = {"lora": None, "full": 5e-5, "freeze": 5e-5, "bitfit": 1e-3, "ia3": 3e-3, "prompt": 3e-2,
             "prefix": 1e-2}
PROMPT = "Write the headline of this BBC news article.\n\n{body}"


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, demo=False, runlocal=False, method="lora", model="smollm2")
    c = common.base_config()

    c.task = "causal_lm"
    c.model.family = None  # from the model's config (llama for SmolLM2)
    c.model.pretrained = "asset:smollm2_135m_instruct" if a.model == "smollm2" else a.model
    c.model.dont_load = ()  # a decoder LM keeps its own output layer: no fresh head

    c.data.name = "bbc_news"
    c.data.text_keys = ("body",)
    c.data.train_split, c.data.dev_split, c.data.test_split = "train", "dev", "test"
    c.data.prompt_template = PROMPT
    c.data.response_key = "headline"
    c.data.truncate_key = "body"
    c.data.truncate_tokens = 96
    c.data.chat_template = True
    c.data.max_length = 192
    c.data.bucket_lengths = (144, 160, 176, 192)
    c.data.group_by_length = 8

    c.batch_size = 8
    c.eval_batch_size = 16
    c.num_epochs = 1.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_fraction = 0.1
    c.schedule.decay = "linear"
    c.generation.max_new_tokens = 24
    c.generation.beams = 1
    c.metric = "rougeL"
    c.metric_mode = "max"
    c.eval_before_training = True
    c.log_every_steps = 5

    c.method_args.lora_rank = 8
    c.method_args.lora_alpha = 16.0
    c.method_args.lora_targets = GPT2_LORA_TARGETS if "gpt2" in a.model else LLAMA_LORA_TARGETS
    common.set_method(c, a.method, METHOD_LR)

    if a.demo:
        c.num_epochs = None
        c.total_steps = 60
        c.eval_every_steps = 30
        c.checkpoint_every_steps = 30
        c.data.eval_limit = 100
    if a.runlocal:
        common.set_runlocal(c, total_steps=4, every=2, log_every=1, batch_size=2, eval_batch_size=4,
                            eval_limit=4, train_limit=16)
        c.generation.max_new_tokens = 8
        c.eval_before_training = False
    return c.lock()
