"""T-topic: BBC News topic classification (5 classes, long articles), 5 methods x 3 seeds.

  python -m ftjax.sweep --grid=configs/grids/t_topic.py --root=DIR
  python -m ftjax.report DIR --out=results/tables/t_topic

configs/bbc_news.py: all-MiniLM-L6-v2, max length 256 (articles truncated), batch 16,
each method's usual learning rate (no per-method tuning here: T-methods does that on
Rotten Tomatoes), for 1 epoch (111 steps; the config trains 2: halved to fit the tables'
CPU budget: full fine-tuning trains about 3 articles a second on 2 cores, 13 times fewer
than Rotten Tomatoes snippets, since every article fills all 256 tokens).
"""


from configs import bert_sst2

METHODS = ("full", "lora", "adapter", "bitfit", "linear_probe")


# the linear probe trains on features the frozen encoder computed once in eval mode
METHOD_ARGS = {"linear_probe": {"method_args.cache_features": True}}


def get_grid(arg=None):
    del arg
    # the learning rate configs/bbc_news.py:method=NAME would set (an override of config.method does not)
    return {"config": "configs/bbc_news.py",
            "fixed": {"num_epochs": 1.0},
            "points": [{"method": m, "optimizer.lr": bert_sst2.METHOD_LR[m] or 5e-5, **METHOD_ARGS.get(m, {})}
                       for m in METHODS],
            "seeds": (0, 1, 2)}
