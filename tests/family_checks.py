"""The checks every text family's test module runs, written once (not a test module).

tests/test_<family>.py call these with their family's name, fixture folder and
closed-form numbers, and keep their family-specific tests:

- parity with the reference implementation (HF transformers, PyTorch): the fixture's
  outputs, its converted classifier and encoder, closeness on the real tokens only;
- methods: the config of a method, its closed-form trainable count, and "what trains
  moves, everything else stays bitwise equal" after jitted train or optimizer steps;
- end to end: the CSV data files, a short training run, the HF export read back.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from ftjax import checkpoint as ckpt_lib
from ftjax import convert, export, methods, models, optim, train, tree
from ftjax import step as step_lib
from ftjax.models import EncoderOptions
from ftjax.tasks import classification
from tests import conftest
from tests.conftest import tiny_config

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TASK2 = classification.Classification(2, ["neg", "pos"])


# ---- parity with the reference ----------------------------------------------------------

def reference_fixture(name: str):
    """A module-scoped pytest fixture `ref`: the arrays of fixtures/{name}_tiny_random_outputs.npz.

    Use as `ref = family_checks.reference_fixture("roberta")` at a test module's top level.
    """

    @pytest.fixture(scope="module", name="ref")
    def _ref() -> dict[str, np.ndarray]:
        return dict(np.load(FIXTURES / f"{name}_tiny_random_outputs.npz"))

    return _ref


def zeros_like_init(model, *inputs) -> Any:
    """Numpy zeros in the shapes of `model`'s params: a fresh init's structure without compiling one.

    Args:
      model: a classifier (or encoder) module.
      *inputs: its call's arrays; none: three int32 ones of shape (1, 4) (ids, mask, types).

    Returns:
      The params tree, every leaf zero.
    """
    inputs = inputs or (jnp.ones((1, 4), jnp.int32),) * 3
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def converted_classifier(family: str, folder: pathlib.Path, num_labels: int = 3):
    """The fixture folder's classifier and its converted params, strictly merged.

    The HF classifier head converts too, so nothing is missing, unexpected or excused:
    the merge raises on any difference from the model's own tree.

    Returns:
      (the classifier module built from the folder's config.json, its params).
    """
    model = classification.build_classifier(family, models.load_hf_config(folder), num_labels=num_labels)
    return model, tree.merge(convert.convert_folder(folder, family), zeros_like_init(model))


@functools.cache
def encoder_fn(family: str, folder: str | pathlib.Path) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The converted encoder of an HF folder, jitted once per folder.

    Returns:
      (input_ids, attention_mask, token_type_ids=None) -> numpy (sequence output, pooled output).
    """
    spec = models.family(family)
    encoder = spec.encoder(spec.config(models.load_hf_config(folder)), EncoderOptions(), None)
    params = convert.convert_folder(folder, family)[family]
    fn = jax.jit(lambda p, ids, mask, types: encoder.apply({"params": p}, ids, mask, types))
    return lambda ids, mask, types=None: tuple(np.asarray(x) for x in fn(params, ids, mask, types))


def assert_close_on_tokens(ours, ref, mask, atol: float) -> None:
    """Asserts |ours - ref| <= atol at the real tokens (mask 1) of [B, L, ...] arrays."""
    keep = np.asarray(mask).astype(bool)
    diff = float(np.abs(np.asarray(ours)[keep] - np.asarray(ref)[keep]).max())
    assert diff <= atol, f"max |difference| on real tokens {diff:.3g} > {atol}"


def assert_padding_changes_nothing(run: Callable, inputs: Sequence[np.ndarray], pad_id: int = 0, extra: int = 5,
                                   atol: float = 1e-5):
    """Asserts that `extra` masked positions after every row change no output.

    Args:
      run: (input_ids, attention_mask, ...) -> (sequence output, *per-row outputs).
      inputs: (input_ids, attention_mask, ...) [B, L] arrays.
      pad_id: the padding positions' input id (the other inputs pad with 0).
      extra: how many positions to add.
      atol: the tolerance, on the real tokens of the sequence output and on the row outputs.

    Returns:
      (outputs, padded outputs, padded inputs).
    """
    ids, mask = inputs[:2]
    padded = (np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
              *(np.pad(x, ((0, 0), (0, extra))) for x in inputs[1:]))
    a, b = run(*inputs), run(*padded)
    assert_close_on_tokens(np.asarray(b[0])[:, :ids.shape[1]], a[0], mask, atol)
    for x, y in zip(a[1:], b[1:]):
        np.testing.assert_allclose(y, x, atol=atol)
    return a, b, padded


# ---- methods ----------------------------------------------------------------------------

def method_config(method: str, **args) -> Any:
    """The base config running `method` with `args` (method_args), lr 1e-2 and no warmup."""
    c = common.base_config()
    c.method = method
    c.method_args.update(args)
    c.optimizer.lr = 1e-2
    c.schedule.warmup_steps = 0
    return c


def abstract_classifier(family: str, hf: dict, config, num_labels: int = 2):
    """(the 2-label classifier of `hf` with the method's additions, its param shapes): no init compile."""
    model = classification.build_classifier(family, hf, num_labels=num_labels, peft=methods.peft(config))
    x = jnp.ones((1, 4), jnp.int32)
    return model, jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, x))["params"]


def trainable_counts(family: str, hf: dict, config, layout=None) -> tuple[int, int]:
    """(trainable params, all params) of the method's own classifier, from shapes alone.

    Args:
      family, hf: the family and its config dict.
      config: a method_config.
      layout: what methods.rules takes; None: the family's layout of `hf`.
    """
    _, shapes = abstract_classifier(family, hf, config)
    trainable_rules, _ = methods.rules(config, models.layout(family, hf) if layout is None else layout)
    return optim.trainable_count(shapes, trainable_rules), tree.count_params(shapes)


class MethodOptimizer(NamedTuple):
    """A method's optimizer on some params and what it trains.

    Attributes:
      tx: the optax transformation (frozen leaves: set_to_zero).
      mask: params-shaped tree, True where the method's rules train.
      trainable: how many parameters train.
      start_of: gradual unfreezing: flat {path: the update its group starts at}; else None.
    """

    tx: optax.GradientTransformation
    mask: Any
    trainable: int
    start_of: dict[str, int] | None


def method_optimizer(config, layout, params) -> MethodOptimizer:
    """The optimizer ftjax builds for config.method on `params` (10 steps an epoch, 10 in all)."""
    trainable_rules, lr_rules = methods.rules(config, layout)
    starts = methods.start_rules(config, layout, steps_per_epoch=10)
    tx, _ = optim.make_optimizer(config, params, 10, trainable_rules, lr_rules, starts)
    start_of = tree.flatten(tree.tree_from_rules(params, starts)) if starts else None
    return MethodOptimizer(tx, tree.tree_from_rules(params, trainable_rules),
                           optim.trainable_count(params, trainable_rules), start_of)


def train_state(params, tx) -> step_lib.TrainState:
    """A TrainState at step 0 with `tx`'s fresh state."""
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(1)))


def train_steps(model, opt: MethodOptimizer, params, batches: Sequence[dict]) -> step_lib.TrainState:
    """Runs the jitted make_train_step (TASK2, the method's trainable mask) on each batch; asserts a finite loss.

    Returns:
      The final TrainState.
    """
    state = train_state(params, opt.tx)
    step = jax.jit(step_lib.make_train_step(model, opt.tx, TASK2, trainable=opt.mask))
    for batch in batches:
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])), metrics
    return state


def optimizer_steps(opt: MethodOptimizer, params, grad: Callable[[Any], Any], updates: int = 2):
    """`updates` jitted optimizer updates, with the gradients `grad(current params)`.

    Returns:
      (the updated params, the optimizer state).
    """

    @jax.jit
    def update(p, g, opt_state):
        changes, opt_state = opt.tx.update(g, opt_state, p)
        return optax.apply_updates(p, changes), opt_state

    new, opt_state = params, opt.tx.init(params)
    for _ in range(updates):
        new, opt_state = update(new, grad(new), opt_state)
    return new, opt_state


def adam_moments(opt_state) -> int:
    """How many numbers the optimizer state holds in arrays (Adam: mu and nu of its leaves)."""
    return sum(x.size for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0)


def assert_trains_exactly(method: str, opt: MethodOptimizer, before: dict, after, opt_state,
                          updates: int) -> dict[str, bool]:
    """Asserts that `updates` updates moved exactly what the method trains by then.

    Frozen leaves (and, under gradual unfreezing, groups that had not started) stay
    bitwise equal; every other leaf moved; Adam holds moments for the trainable leaves only;
    the method trains something, and only "full" trains everything.

    Args:
      method: config.method.
      opt: the method's optimizer on the params before the updates.
      before: flat {path: array} of the params before the updates (a copy if they were donated).
      after: the params tree after the updates.
      opt_state: the optimizer state after the updates.
      updates: how many updates ran.

    Returns:
      Flat {path: whether it must have moved}.
    """
    moves = tree.flatten(opt.mask)
    if opt.start_of:  # gradual unfreezing: groups starting at a later update have not moved yet
        moves = {p: t and opt.start_of[p] < updates for p, t in moves.items()}
    assert any(moves.values()) and (method == "full" or not all(moves.values())), method
    assert adam_moments(opt_state) == 2 * opt.trainable, (adam_moments(opt_state), opt.trainable)
    after = tree.flatten(after)
    for path, trains in moves.items():
        unchanged = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
        assert unchanged != trains, path  # frozen: bitwise equal; trainable: moved
    return moves


# ---- end to end -------------------------------------------------------------------------

def data_files(folder: pathlib.Path, vocab: pathlib.Path | None = None, train_rows: int = 48) -> dict:
    """The tiny text setting's files in `folder`: tokenizer (`vocab`, else a WordPiece one), CSVs, TFDS dir.

    The dev and test splits have 20 and 12 rows.
    """
    return conftest.data_files(folder, train=train_rows, dev=20, test=12, vocab=vocab)


def files_fixture(train_rows: int = 48):
    """A module-scoped pytest fixture `files`: data_files in a fresh folder.

    Use as `files = family_checks.files_fixture()` at a test module's top level.
    """

    @pytest.fixture(scope="module", name="files")
    def _files(tmp_path_factory) -> dict:
        return data_files(tmp_path_factory.mktemp("data"), train_rows=train_rows)

    return _files


class Exported(NamedTuple):
    """What train_and_export leaves: the run's summary, its export and the HF folder."""

    summary: dict
    params: Any
    meta: dict
    hf: dict
    hf_dir: pathlib.Path


def train_and_export(files: dict, tmp_path: pathlib.Path, family: str, steps: int, architecture: str,
                     **overrides) -> Exported:
    """Trains the family's tiny classifier, exports it to HF and reads that back.

    Asserts: `steps` steps, one eval of the 20 dev and 12 test rows at the end with a
    finite loss, an export of `family`, config.json's architectures == [architecture],
    and the HF folder converts back to exactly the exported params.

    Args:
      files: data_files (or the `files` fixture).
      tmp_path: the run goes to tmp_path/"w", the HF folder to tmp_path/"hf".
      family: config.model.family.
      steps: total steps; the eval and the checkpoint come at the last one.
      architecture: the transformers class the export must name.
      **overrides: more flattened config keys (the default eval bucket is one of 16 tokens).
    """
    workdir = tmp_path / "w"
    config = tiny_config(files, **{"model.family": family, "total_steps": steps, "eval_every_steps": steps,
                                   "checkpoint_every_steps": steps, "data.bucket_lengths": (16,), **overrides})
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["final_step"] == steps and np.isfinite(summary["dev"]["loss"]), summary
    assert summary["dev"]["num_examples"] == 20 and summary["test"]["num_examples"] == 12, summary
    params, meta = ckpt_lib.load_export(str(workdir))
    assert meta["family"] == family and family in params, meta
    hf_dir = export.export_hf(str(workdir), str(tmp_path / "hf"))
    hf = json.loads((hf_dir / "config.json").read_text())
    assert hf["architectures"] == [architecture], hf["architectures"]
    back, ours = tree.flatten(convert.convert_folder(hf_dir, family)), tree.flatten(params)
    assert sorted(back) == sorted(ours)
    for k, v in ours.items():
        np.testing.assert_array_equal(back[k], np.asarray(v, np.float32), err_msg=k)
    return Exported(summary, params, meta, hf, hf_dir)
