"""GLUE dev with Houlsby adapters (Houlsby et al. 2019): lr x adapter size picked per task on dev.

  python -m ftjax.sweep --grid=configs/grids/glue_adapter.py:rte --root=DIR/glue_adapter/rte
  python -m ftjax.sweep --grid=configs/grids/glue_adapter.py:rte,size=64 --root=...

Arg: TASK, then optionally model=NAME (default bert-base-uncased; the paper's Table 1 used
bert-large-uncased), size=N (one adapter size: Table 1's fixed "64" row; default: the
sizes {8, 64, 256}, picked per task as its "8-256" row), epochs (also sweep the epoch
count over {3, 20}, as Sec. 3.1 does; default: 20 for tasks under 10k examples, 3
otherwise) and seeds=N. Points: lr {3e-5, 3e-4, 3e-3} x the sizes (x the epochs), batch
32. The best point by mean dev score (the task's metric) runs again with more seeds
(glue.seed_split).
"""

from ftjax.sweep import product

from configs import glue


def get_grid(arg=None):
    task, a = glue.grid_arg(arg, size=0, epochs=False)
    axes = {"optimizer.lr": glue.HOULSBY_LRS,
            "method_args.adapter_size": (a.size,) if a.size else glue.HOULSBY_SIZES}
    if a.epochs:
        axes["num_epochs"] = glue.HOULSBY_EPOCHS
    grid_seeds, tune_seeds = glue.seed_split(task, a.seeds)
    return {
        "config": glue.config_arg(task, "adapter", a.model),
        "points": product(**{k.replace(".", "__"): v for k, v in axes.items()}),
        "seeds": grid_seeds,
        "fixed": {},
        "tune": {"over": tuple(axes), "metric": glue.selection_metric(task, "adapter"), "split": "dev",
                 "mode": "max", "seeds": tune_seeds},
    }
