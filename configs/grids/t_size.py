"""T-size (BERT Table 6 / Turc et al. analogue): full fine-tuning of three model sizes.

  python -m ftjax.sweep --grid=configs/grids/t_size.py --root=DIR          # MiniLM-L3, -L6: 3 seeds
  python -m ftjax.sweep --grid=configs/grids/t_size.py:mpnet --root=DIR    # MPNet-base: 1 seed
  python -m ftjax.report DIR --out=results/tables/t_size

The offline text demo (Rotten Tomatoes by-movie split, batch 32, max length 64, lr 5e-5)
for 1 epoch, as T-methods: paraphrase-MiniLM-L3-v2 (17.4M params, 3 layers x 384),
all-MiniLM-L6-v2 (22.7M, 6 x 384) and all-mpnet-base-v2 (109.5M, 12 x 768). MPNet-base
costs ~8x a MiniLM-L6 step on 2 CPU cores: one seed fits the tables' budget.
"""

SMALL = [{"model.pretrained": "asset:minilm_l3"}, {"model.pretrained": "asset:minilm"}]
MPNET = [{"model.pretrained": "asset:mpnet_base", "model.family": "mpnet"}]


def get_grid(arg=None):
    mpnet = arg == "mpnet"
    return {"config": "configs/bert_sst2.py:demo", "fixed": {"num_epochs": 1.0},
            "points": MPNET if mpnet else SMALL, "seeds": (0,) if mpnet else (0, 1, 2)}
