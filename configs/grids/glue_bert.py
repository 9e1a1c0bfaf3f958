"""GLUE dev with the BERT recipe (Devlin et al. 2019): the learning rate picked per task on dev.

  python -m ftjax.sweep --grid=configs/grids/glue_bert.py:rte --root=DIR/glue_bert/rte
  python -m ftjax.sweep --grid=configs/grids/glue_bert.py:rte,model=bert-large-uncased --root=...

Arg: TASK (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte), then optionally model=NAME (default
bert-base-uncased) and seeds=N. Points: Sec. 4.1's lr grid {5e-5, 4e-5, 3e-5, 2e-5}, batch
32, 3 epochs (configs/glue.py). The lr with the best mean dev score (the task's metric,
configs/glue.py selection_metric) runs again with more seeds: small tasks pick on 3 seeds and
end with 5, large tasks pick on 1 and end with 3 (glue.seed_split).
"""

from configs import glue


def get_grid(arg=None):
    task, a = glue.grid_arg(arg)
    grid_seeds, tune_seeds = glue.seed_split(task, a.seeds)
    return {
        "config": glue.config_arg(task, "full", a.model),
        "points": [{"optimizer.lr": lr} for lr in glue.BERT_LRS],
        "seeds": grid_seeds,
        "fixed": {},
        "tune": {"over": ("optimizer.lr",), "metric": glue.selection_metric(task, "full"), "split": "dev",
                 "mode": "max", "seeds": tune_seeds},
    }
