"""T-methods: every fine-tuning method on the offline text demo, its lr tuned on dev, 3 seeds.

  python -m ftjax.sweep --grid=configs/grids/t_methods.py --root=DIR
  python -m ftjax.report DIR --tuned --out=results/tables/t_methods

all-MiniLM-L6-v2 on Rotten Tomatoes (by-movie split), the demo's batch 32, max length 64
and schedule, for 1 epoch (the demo trains 2: halved to fit the tables' CPU budget).
Each method runs a 3-point learning-rate grid around its usual rate (METHOD_LR of
configs/bert_sst2.py) with seed 0; the rate with the best dev accuracy then runs with
seeds 1 and 2, as the methods' papers tune the rate per method.
"""

# method -> its 3 learning rates (AdamW), the middle one the method's usual rate
LRS = {
    "full": (2e-5, 5e-5, 1e-4),
    "linear_probe": (3e-4, 1e-3, 3e-3),
    "freeze": (2e-5, 5e-5, 1e-4),
    "gradual_unfreezing": (2e-5, 5e-5, 1e-4),
    "bitfit": (3e-4, 1e-3, 3e-3),
    "layernorm": (3e-4, 1e-3, 3e-3),
    "lora": (2e-4, 5e-4, 1.5e-3),
    "ia3": (1e-3, 3e-3, 1e-2),
    "adapter": (3e-4, 1e-3, 3e-3),
    "prompt": (1e-2, 3e-2, 1e-1),
    "prefix": (3e-3, 1e-2, 3e-2),
}


# what configs/bert_sst2.py:demo,method=NAME sets besides the method (an override of
# config.method alone does not): freeze the embeddings and bottom 3 layers; unfreeze one
# of MiniLM's 8 groups every 1/8 epoch. The linear probe trains on features the frozen
# encoder computed once in eval mode (method_args.cache_features: the usual linear probe,
# and ~700x cheaper per epoch than encoding every batch again with dropout on)
METHOD_ARGS = {"freeze": {"method_args.freeze_bottom_k": 3},
               "linear_probe": {"method_args.cache_features": True},
               "gradual_unfreezing": {"method_args.unfreeze_every_epochs": 0.125}}


def get_grid(arg=None):
    methods = arg.split("+") if arg else list(LRS)
    return {
        "config": "configs/bert_sst2.py:demo",
        "fixed": {"num_epochs": 1.0},
        "points": [{"method": m, **METHOD_ARGS.get(m, {}), "optimizer.lr": lr} for m in methods for lr in LRS[m]],
        "seeds": (0,),
        "tune": {"over": ("optimizer.lr",), "metric": "accuracy", "split": "dev", "seeds": (1, 2)},
    }
