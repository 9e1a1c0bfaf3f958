r"""Fine-tune BERT on SST-2 (GLUE), the setting of Devlin et al. 2019.

  python -m ftjax.main --config=configs/bert_sst2.py --workdir=/tmp/bert_sst2

No arg: bert-base-uncased (hub name or an HF snapshot folder via
--config.model.pretrained=PATH) on TFDS `glue/sst2`: lr 2e-5, batch 32, 3 epochs, 10%
warmup then linear decay, max length 128, AdamW (weight decay 0.01, none on biases and
LayerNorm), dev evaluation on the full validation split each epoch. Expected: SST-2 dev
accuracy about 92.7 (BERT paper, Table 5); the HF Flax example reports 92.23 +- 0.57
over 5 seeds.

Args (combinable, e.g. `configs/bert_sst2.py:demo,runlocal`):
  demo      all-MiniLM-L6-v2 (pinned offline asset) on the Rotten Tomatoes critic
            snippets (pinned offline asset, split by movie), fully offline. Expected:
            dev accuracy >= 0.82 in under 15 min on a 2-core CPU (results/demo/).
  runlocal  a few dozen steps on a small subset with frequent evals and checkpoints,
            for smoke tests.
  model=    another pretrained model: a folder, a hub name or asset:NAME; the offline
            assets minilm, minilm_l3 (paraphrase-MiniLM-L3-v2, ONNX) and mpnet_base
            (all-mpnet-base-v2) by name. The family comes from its config.json
            model_type (bert, roberta/xlm-roberta, distilbert, electra, deberta-v2,
            mpnet). Without demo, the hub names in RECIPES take their papers'
            GLUE recipe (below); e.g. `model=roberta-base`, `model=microsoft/deberta-v3-base`.
            `:demo,model=minilm_l3` and `:demo,model=mpnet_base` run offline on the
            demo budget.
  method=   a fine-tuning method of ftjax/methods/ (full, linear_probe, freeze,
            gradual_unfreezing, bitfit,
            layernorm, lora, ia3, adapter, prompt, prefix), with its usual learning
            rate (METHOD_LR) unless --config.optimizer.lr says otherwise.
"""

from configs import common

OFFLINE_MODELS = ("minilm", "minilm_l3", "mpnet_base")  # model=NAME means asset:NAME

# The GLUE fine-tuning recipe of each family's paper, for SST-2-sized tasks (keys are
# config paths). RoBERTa (Liu et al. 2019, Table 10): lr {1e-5, 2e-5, 3e-5}, batch
# {16, 32}, 6% warmup, weight decay 0.1, 10 epochs. MPNet (Song et al. 2020) follows
# RoBERTa's. ELECTRA (Clark et al. 2020, Table 7): lr 3e-4 small / 1e-4 base, layer-wise
# lr decay 0.8, 10% warmup, no weight decay, Adam eps 1e-6, 3 epochs. DeBERTa-v3 (He et
# al. 2021): lr around 2e-5, batch 32, 3 epochs. DistilBERT (Sanh et al. 2019): BERT's.
_ROBERTA = {"optimizer.lr": 2e-5, "schedule.warmup_fraction": 0.06, "optimizer.weight_decay": 0.1,
            "num_epochs": 10.0}
_ELECTRA = {"schedule.warmup_fraction": 0.1, "optimizer.weight_decay": 0.0, "optimizer.eps": 1e-6,
            "method_args.layerwise_lr_decay": 0.8, "num_epochs": 3.0}
RECIPES = {
    "roberta-base": _ROBERTA, "FacebookAI/roberta-base": _ROBERTA,
    "roberta-large": {**_ROBERTA, "optimizer.lr": 1e-5, "batch_size": 16},
    "xlm-roberta-base": _ROBERTA, "FacebookAI/xlm-roberta-base": _ROBERTA,
    "microsoft/mpnet-base": {**_ROBERTA, "optimizer.lr": 1e-5},
    "google/electra-small-discriminator": {**_ELECTRA, "optimizer.lr": 3e-4},
    "google/electra-base-discriminator": {**_ELECTRA, "optimizer.lr": 1e-4},
    "microsoft/deberta-v3-base": {"optimizer.lr": 2e-5, "schedule.warmup_fraction": 0.1, "num_epochs": 3.0},
    "microsoft/deberta-v3-small": {"optimizer.lr": 3e-5, "schedule.warmup_fraction": 0.1, "num_epochs": 3.0},
    "distilbert-base-uncased": {"optimizer.lr": 5e-5, "num_epochs": 3.0},
    "distilbert/distilbert-base-uncased": {"optimizer.lr": 5e-5, "num_epochs": 3.0},
}

# Learning rates the methods' papers use for encoders of this size (AdamW): frozen
# backbones need larger steps on their few parameters than full fine-tuning.
METHOD_LR = {
    "full": None,          # the setting's own (2e-5 paper, 5e-5 demo)
    "freeze": None,
    "gradual_unfreezing": None,
    "linear_probe": 1e-3,
    "bitfit": 1e-3,        # Ben Zaken et al. 2022: 1e-4..1e-3
    "layernorm": 1e-3,
    "lora": 5e-4,          # Hu et al. 2021, RoBERTa-base SST-2
    "ia3": 3e-3,           # Liu et al. 2022
    "adapter": 1e-3,       # Houlsby et al. 2019: {3e-5, 3e-4, 3e-3}
    "prompt": 3e-2,        # Lester et al. 2021 use 0.3 with Adafactor
    "prefix": 1e-2,        # P-tuning v2 on small encoders
}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, demo=False, runlocal=False, model="", method="full")
    c = common.base_config()

    c.model.family = "bert"
    c.model.pretrained = "bert-base-uncased"
    c.data.name = "glue/sst2"
    c.data.text_keys = ("sentence",)
    c.data.train_split, c.data.dev_split, c.data.test_split = "train", "validation", None
    c.data.max_length = 128
    c.data.bucket_lengths = (32, 64, 128)
    c.batch_size = 32
    c.num_epochs = 3.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 2e-5
    c.optimizer.weight_decay = 0.01
    c.schedule.warmup_fraction = 0.1
    c.schedule.decay = "linear"
    c.eval_batch_size = 64
    c.metric = "accuracy"

    if a.demo:
        # Snippets average ~25 word pieces: 64 tokens covers them, and short buckets
        # keep a 2-core CPU step well under a second.
        c.model.pretrained = "asset:minilm"
        # all-MiniLM-L6-v2 was trained as a mean-pooled sentence encoder: its [CLS]
        # pooler is untrained for that use (pooler: dev 0.804, mean: 0.815 on a
        # seed-0 numpy movie split, same budget).
        c.model.pooling = "mean"
        c.data.name = "rotten_tomatoes"
        c.data.text_keys = ("text",)
        c.data.train_split, c.data.dev_split, c.data.test_split = "train", "dev", "test"
        c.data.max_length = 64
        c.data.bucket_lengths = (16, 24, 32, 40, 48, 64)
        c.data.group_by_length = 32
        c.num_epochs = 2.0
        c.optimizer.lr = 5e-5
        c.eval_batch_size = 128
        c.log_every_steps = 20

    if a.model:
        c.model.family = None  # chosen by the model's config.json model_type
        c.model.pretrained = f"asset:{a.model}" if a.model in OFFLINE_MODELS else a.model
        if not a.demo:
            c.update_from_flattened_dict(RECIPES.get(a.model, {}))
    common.set_method(c, a.method, METHOD_LR)
    if a.method == "gradual_unfreezing":
        c.method_args.unfreeze_every_epochs = 0.125  # all 8 groups of MiniLM in the first epoch
    if a.method == "freeze":
        c.method_args.freeze_bottom_k = 3  # the embeddings and the bottom 3 layers

    if a.runlocal:
        common.set_runlocal(c, total_steps=24, every=8, log_every=4, batch_size=16,
                            eval_batch_size=32, eval_limit=128)

    return c.lock()
