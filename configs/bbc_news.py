r"""BBC News topic classification (5 topics, long articles), fully offline.

  python -m ftjax.main --config=configs/bbc_news.py --workdir=/tmp/bbc_news

all-MiniLM-L6-v2 (pinned asset, mean pooling) on the BBC News articles of Greene &
Cunningham 2006 (pinned asset `bbc_news`, builder `data.name=bbc_news`): 2,225 articles
in business / entertainment / politics / sport / tech, with ftjax's seeded stratified
80/10/10 split (seed 0: 1,781 train / 221 dev / 223 test; ftjax/data/builders/bbc_news.py).
The input is the headline and the body; articles average ~390 words, so they are cut at
`max_length` 256 word pieces (about the first 180 words: the headline and the lead
paragraphs). Batch 16, 2 epochs, AdamW with 10% warmup and linear decay, dev accuracy
every half epoch; the learning rate is each method's usual one (METHOD_LR of
configs/bert_sst2.py).

Args (combinable):
  method=   full (default), linear_probe, freeze, gradual_unfreezing, bitfit, layernorm,
            lora, ia3, adapter, prompt, prefix.
  model=    minilm (default), minilm_l3, mpnet_base (offline assets), or a folder / hub name.
  runlocal  a few dozen steps on a subset, for smoke tests.
"""

from configs import bert_sst2, common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, runlocal=False, model="minilm", method="full")
    c = common.base_config()

    c.model.family = None  # from the model's config.json
    c.model.pretrained = f"asset:{a.model}" if a.model in bert_sst2.OFFLINE_MODELS else a.model
    c.model.pooling = "mean"  # sentence-transformers encoders were trained mean-pooled
    c.data.name = "bbc_news"
    c.data.text_keys = ("text",)
    c.data.train_split, c.data.dev_split, c.data.test_split = "train", "dev", "test"
    c.data.max_length = 256
    c.data.bucket_lengths = (128, 192, 256)
    c.data.group_by_length = 16
    c.batch_size = 16
    c.num_epochs = 2.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-5
    c.optimizer.weight_decay = 0.01
    c.schedule.warmup_fraction = 0.1
    c.schedule.decay = "linear"
    c.eval_every_steps = 56  # half an epoch of 1,781 articles at batch 16
    c.checkpoint_every_steps = 56
    c.eval_batch_size = 64
    c.log_every_steps = 10
    c.metric = "accuracy"

    common.set_method(c, a.method, bert_sst2.METHOD_LR)
    if a.method == "gradual_unfreezing":
        c.method_args.unfreeze_every_epochs = 0.125
    if a.method == "freeze":
        c.method_args.freeze_bottom_k = 3

    if a.runlocal:
        common.set_runlocal(c, total_steps=12, every=6, log_every=2, batch_size=8, eval_batch_size=16,
                            eval_limit=32, train_limit=64)
        c.data.max_length = 64
        c.data.bucket_lengths = (64,)
    return c.lock()
