"""GLUE dev with LoRA on RoBERTa-base (Hu et al. 2021): the paper's per-task setting, several seeds.

  python -m ftjax.sweep --grid=configs/grids/glue_lora.py:rte --root=DIR/glue_lora/rte

Arg: TASK, then optionally model=NAME (default roberta-base) and seeds=N. The paper gives
one tuned setting per task (Appendix D, Table 9: lr, epochs, batch; configs/glue.py
LORA_ROBERTA_BASE) and reports the median of 5 seeds, so there is no lr grid to tune: one
point, run with 5 seeds on the small tasks and 3 on the large ones by default (seeds=5
for the paper's count everywhere; MNLI and QQP take 25-30 epochs each).
"""

from configs import glue


def get_grid(arg=None):
    task, a = glue.grid_arg(arg)
    grid_seeds, tune_seeds = glue.seed_split(task, a.seeds)
    return {
        "config": glue.config_arg(task, "lora", a.model),
        "points": [{"optimizer.lr": glue.LORA_ROBERTA_BASE[task][0]}],
        "seeds": grid_seeds + tune_seeds,
        "fixed": {},
        "tune": None,
    }
