"""Orbax checkpoints: round trips with frozen optimizer leaves, keep/best-k, other meshes, refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import checkpoint as ckpt_lib
from ftjax import step as step_lib


def _state(scale=1.0):
    params = {"body": {"kernel": jnp.full((4, 8), scale)}, "head": {"kernel": jnp.full((8, 2), scale),
                                                                   "bias": jnp.zeros((2,))}}
    labels = {"body": {"kernel": "frozen"}, "head": {"kernel": "train", "bias": "train"}}
    tx = optax.multi_transform({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return step_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=opt_state,
                               rng=jax.random.key_data(jax.random.key(0)))


def _on(mesh, tree):
    rep = step_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, rep), tree)


def _abstract(tree, mesh):
    rep = step_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def _ckpt(workdir, **kw):
    args = dict(keep=2, keep_best=1, metric="accuracy", mode="max", fingerprint={"model": "toy", "n": 50})
    args.update(kw)
    return ckpt_lib.Checkpointer(workdir, **args)


def test_round_trip_on_8_then_1_and_4_devices(tmp_path):
    mesh8 = step_lib.make_mesh()
    state = _on(mesh8, _state())
    c = _ckpt(tmp_path)
    c.save(3, state, extra={"best_value": 0.5}, force=True)
    c.wait()
    for n in (1, 4):
        mesh = step_lib.make_mesh(jax.devices()[:n])
        restored, extra = _ckpt(tmp_path).restore(_abstract(state, mesh))
        assert extra == {"best_value": 0.5}
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert restored.params["head"]["kernel"].sharding.mesh.size == n
    # frozen leaves hold no moments, before and after
    assert len(jax.tree.leaves(restored.opt_state)) == len(jax.tree.leaves(state.opt_state))


def test_keep_recent_and_best(tmp_path):
    mesh = step_lib.make_mesh()
    c = _ckpt(tmp_path)
    for step, acc in [(1, 0.6), (2, 0.9), (3, 0.7), (4, 0.8)]:
        s = _on(mesh, _state(scale=float(step)))
        c.save(step, s, extra={}, force=True)
        c.save_best(step, s, metrics={"accuracy": acc}, extra={})
    c.wait()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
    assert c.best_step() == 2
    best = c.restore_best(_abstract(ckpt_lib.best_tree(_state()), mesh))
    assert float(best["params"]["head"]["kernel"][0, 0]) == 2.0 and best["model_state"] == {}


def test_min_mode_best(tmp_path):
    mesh = step_lib.make_mesh()
    c = _ckpt(tmp_path, metric="loss", mode="min")
    for step, loss in [(1, 0.5), (2, 0.2), (3, 0.4)]:
        c.save_best(step, _on(mesh, _state(float(step))), metrics={"loss": loss}, extra={})
    c.wait()
    assert c.best_step() == 2


def test_other_model_in_workdir_is_refused_and_kept(tmp_path):
    mesh = step_lib.make_mesh()
    c = _ckpt(tmp_path)
    c.save(1, _on(mesh, _state()), extra={}, force=True)
    c.wait()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        _ckpt(tmp_path, fingerprint={"model": "other", "n": 51})
    assert "different model" in str(e.value) and "\n" not in str(e.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_corrupt_checkpoint_is_named_and_kept(tmp_path):
    mesh = step_lib.make_mesh()
    state = _on(mesh, _state())
    c = _ckpt(tmp_path)
    c.save(5, state, extra={}, force=True)
    c.wait()
    step_dir = tmp_path / "checkpoints" / "5"
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():  # truncate every array file and the metadata
            f.write_bytes(b"\0garbage")
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        _ckpt(tmp_path).restore(_abstract(state, mesh))
    assert str(step_dir) in str(e.value) and "\n" not in str(e.value)
    assert step_dir.exists()


def test_export_round_trip_replaces_the_old_export(tmp_path):
    params = {"head": {"kernel": np.arange(6, dtype=np.float32).reshape(3, 2)}}
    ckpt_lib.export_params(tmp_path / "export", params, {"num_labels": 2})
    ckpt_lib.export_params(tmp_path / "export", jax.tree.map(lambda x: x + 1, params), {"num_labels": 2})
    loaded, meta = ckpt_lib.load_export(tmp_path)  # a workdir holding export/
    assert meta == {"num_labels": 2}
    np.testing.assert_array_equal(loaded["head"]["kernel"], params["head"]["kernel"] + 1)
    assert not (tmp_path / "export.tmp").exists() and not (tmp_path / "export.old").exists()
    with pytest.raises(ckpt_lib.CheckpointError, match="not an ftjax export"):
        ckpt_lib.load_export(tmp_path / "nothing")
    json.loads((tmp_path / "export" / "meta.json").read_text())


def test_checksums_do_not_depend_on_sharding_and_see_one_changed_element():
    mesh = step_lib.make_mesh()
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    sharded = jax.device_put(x, step_lib.data_sharded(mesh))
    assert ckpt_lib.checksums({"x": sharded}) == ckpt_lib.checksums({"x": x})
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places: a plain sum would miss it
    assert ckpt_lib.checksums({"x": swapped}) != ckpt_lib.checksums({"x": x})
    key = jax.random.key(0)
    assert set(ckpt_lib.checksums({"k": key, "b": np.ones(3, bool), "h": np.ones(2, np.float16)})) == {"k", "b", "h"}


def test_data_that_no_longer_matches_its_checksums_is_refused_and_kept(tmp_path):
    mesh = step_lib.make_mesh()
    state = _on(mesh, _state())
    c = _ckpt(tmp_path)
    c.save(5, state, extra={}, force=True)
    c.wait()
    step_dir = tmp_path / "checkpoints" / "5"
    sums = next(p for p in (step_dir / "checksums").rglob("*") if p.is_file())
    stored = json.loads(sums.read_text())
    key = next(k for k in stored if "head" in k)
    stored[key] = (stored[key] + 1) % (1 << 32)  # as if that array's data had been garbled
    sums.write_text(json.dumps(stored))
    with pytest.raises(ckpt_lib.CheckpointError, match="damaged") as e:
        _ckpt(tmp_path).restore(_abstract(state, mesh))
    assert str(step_dir) in str(e.value) and key in str(e.value)
    assert step_dir.exists()


def test_a_save_cut_short_leaves_the_previous_checkpoint_in_use_and_in_place(tmp_path):
    mesh = step_lib.make_mesh()
    state = _on(mesh, _state())
    c = _ckpt(tmp_path)
    c.save(3, state, extra={"at": 3}, force=True)
    c.wait()
    # what a process killed during the save of step 5 leaves behind: Orbax's staging folder
    partial = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_bytes(b"{\"half")
    again = _ckpt(tmp_path)
    assert again.latest_step() == 3
    restored, extra = again.restore(_abstract(state, mesh))
    assert extra == {"at": 3}
    np.testing.assert_array_equal(np.asarray(restored.params["head"]["kernel"]),
                                  np.asarray(state.params["head"]["kernel"]))
    assert partial.exists()  # ftjax deletes nothing it did not write
