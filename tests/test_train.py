"""End-to-end training: train_and_evaluate on tiny synthetic knees, resume, workdir contents."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from data_prep import synthetic_knee
from kpn_jax import checkpointing, train
from tests.compiles import train_step_compiles

pytestmark = pytest.mark.slow  # end-to-end training runs


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **overrides):
    from configs import demo

    config = demo.get_config()
    config.data_dir = data_dir
    config.synthetic.update(dict(image_size=64, num_train=48, num_validation=16, num_test=16,
                                 num_unlabeled=16))
    config.model.update(dict(depth=18, width=8))
    config.batch_size = 8
    config.unlabeled_batch_size = 8
    config.eval_batch_size = 16
    config.num_epochs = 2
    config.log_every_steps = 2
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 1000
    config.coherence.num_components = 2
    config.num_data_threads = 2
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    synthetic_knee.build_for_config(config)  # as run.py does before training
    return config


def latest_params(workdir, config):
    """The parameters of the latest checkpoint of ``workdir`` as a flat dict of numpy arrays."""
    from kpn_jax import input_pipeline, keypoints, parallel

    handle = input_pipeline.open_dataset(config)
    model = train.create_model(config, handle.keypoint_schema)
    tx = train.make_optimizer(config, 1)
    mesh = parallel.make_mesh()
    state = train.create_state(config, model, tx, handle.image_size,
                               keypoints.get_schema(handle.keypoint_schema).num_points, mesh)
    ckpt = checkpointing.Checkpointer(workdir)
    state = ckpt.restore(state)
    ckpt.close()
    leaves = jax.tree_util.tree_flatten_with_path({"p": state.params, "b": state.batch_stats,
                                                   "ema": state.ema})[0]
    return int(state.step), {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def test_train_writes_the_workdir_and_resumes_exactly(data_dir, tmp_path):
    # Uninterrupted: 6 steps = one epoch of 48/8; the GMM term switches on after half an epoch.
    config = tiny_config(data_dir, max_steps=6, **{"coherence.warmup_epochs": 0.5})
    full = tmp_path / "full"
    # One compile of the train step per run: the carried state keeps its dtypes.
    results, compiles = train_step_compiles(lambda: train.train_and_evaluate(config, str(full)))
    assert compiles == 1

    for name in ("config.json", "data_info.json", "gmm.npz", "metrics.jsonl",
                 "report/results.md", "report/results.json", "report/learning_curves.png",
                 "report/confusion_matrices_validation.png", "report/confusion_matrices_test.png",
                 "checkpoints/best.json"):
        assert (full / name).exists(), name
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((full / "report" / "results.json").read_text())
    assert set(saved) == {"validation", "test"}
    assert saved["test"]["kl"]["accuracy"] == pytest.approx(results["test"]["kl"]["accuracy"])
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    # The warm-up switch: the incoherence loss enters the total only after it.
    assert train_records[0]["train/gmm_on"] == 0.0 and train_records[-1]["train/gmm_on"] == 1.0
    assert all(np.isfinite(r["train/loss"]) for r in train_records)
    for key in ("train/input_wait_fraction", "train/transfer_wait_fraction"):
        assert all(0.0 <= r[key] <= 1.0 for r in train_records), key
    assert any("validation/kl/accuracy" in r for r in records)

    # Interrupted after 3 steps, then restarted with the same command, this time reading the
    # data in two worker processes: the same batches, so the same parameters.
    stopped = tmp_path / "stopped"
    train.train_and_evaluate(tiny_config(data_dir, max_steps=3,
                                         **{"coherence.warmup_epochs": 0.5}), str(stopped))
    assert latest_params(stopped, config)[0] == 3
    _, compiles = train_step_compiles(lambda: train.train_and_evaluate(
        tiny_config(data_dir, max_steps=6, num_data_workers=2,
                    **{"coherence.warmup_epochs": 0.5}), str(stopped)))
    assert compiles == 1  # and once on a resume
    step_a, params_a = latest_params(full, config)
    step_b, params_b = latest_params(stopped, config)
    assert step_a == step_b == 6
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_allclose(params_a[key], params_b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    resumed = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in line]
    # Records past the checkpoint are dropped on resume; the stopped run logged its last step 3.
    assert resumed == [2, 3, 4, 6]


def test_global_pooling_baseline_trains_without_gmm(data_dir, tmp_path):
    config = tiny_config(data_dir, max_steps=2, **{"model.pooling": "global",
                                                  "coherence.enabled": False})
    results = train.train_and_evaluate(config, str(tmp_path / "baseline"))
    assert not (tmp_path / "baseline" / "gmm.npz").exists()
    for task in ("kl", "ost_tibia_medial"):
        assert 0.0 <= results["validation"][task]["accuracy"] <= 1.0


def test_mixup_and_soft_ordinal_labels_train_and_change_what_is_learned(data_dir, tmp_path):
    options = {"model.pooling": "global", "coherence.enabled": False, "tasks": ("kl",)}
    plain = tiny_config(data_dir, max_steps=2, **options)
    train.train_and_evaluate(plain, str(tmp_path / "plain"))
    _, params_plain = latest_params(tmp_path / "plain", plain)
    for name, change in (("mixup", {"mixup_alpha": 0.4}), ("sord", {"ordinal_label_sigma": 0.4})):
        changed = tiny_config(data_dir, max_steps=2, **change, **options)
        results = train.train_and_evaluate(changed, str(tmp_path / name))
        assert 0.0 <= results["validation"]["kl"]["accuracy"] <= 1.0
        _, params_changed = latest_params(tmp_path / name, changed)
        assert any(not np.allclose(params_changed[key], params_plain[key])
                   for key in params_plain), name


def test_subset_of_tasks_and_coherence_refuses_partial_tasks(data_dir, tmp_path):
    config = tiny_config(data_dir, max_steps=2, tasks=("kl",), **{"coherence.enabled": False})
    results = train.train_and_evaluate(config, str(tmp_path / "kl_only"))
    assert results["validation"]["kl"]["count"] == 16
    assert results["validation"]["jsn_medial"]["count"] == 0
    with pytest.raises(ValueError, match="needs all 7 tasks"):
        train.validate_config(tiny_config(data_dir, tasks=("kl",)))


def test_another_architecture_in_the_workdir_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, max_steps=1)
    train.train_and_evaluate(config, str(tmp_path / "w"))
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.depth"):
        train.train_and_evaluate(tiny_config(data_dir, max_steps=2, **{"model.depth": 34}),
                                 str(tmp_path / "w"))


def test_the_stem_max_pool_is_part_of_the_network(data_dir):
    """``model.stem_max_pool`` reaches the model (same parameters, another function), an
    older config without the field builds the max-pool, and a workdir trained with the
    other setting is refused."""
    config = tiny_config(data_dir, tasks=("kl",), **{"coherence.enabled": False,
                                                      "model.pooling": "global"})
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 64, 1)), jnp.float32)
    with_pool = train.create_model(config)
    variables = with_pool.init(jax.random.key(0), images)
    config.model.stem_max_pool = False
    without_pool = train.create_model(config)
    assert not without_pool.stem_max_pool
    assert (jax.tree.structure(without_pool.init(jax.random.key(0), images))
            == jax.tree.structure(variables))
    assert not np.allclose(with_pool.apply(variables, images)["kl"],
                           without_pool.apply(variables, images)["kl"])
    older = ConfigDict(config.to_dict())
    del older.model["stem_max_pool"]
    assert train.create_model(older).stem_max_pool
    saved = {"model": {"stem_max_pool": True}}
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.stem_max_pool"):
        checkpointing.check_config_compatible(saved, config)


def test_recipe_options_train_and_resume_exactly_with_the_moving_average(data_dir, tmp_path):
    """KL only, mirrored knees, grey-level changes, SGD, cosine with warm-up, label smoothing
    and a moving average of the weights: the average is checkpointed (a resumed run ends
    equal to an uninterrupted one) and is what evaluation uses."""
    options = {"tasks": ("kl",), "coherence.enabled": False, "augment.hflip": True,
               "augment.contrast": 0.2, "augment.brightness": 0.05, "augment.gamma": 0.2,
               "optimizer": "sgd", "eval_hflip": True, "lr_schedule": "cosine",
               "lr_warmup_epochs": 0.5, "label_smoothing": 0.1, "ema_decay": 0.9}
    config = tiny_config(data_dir, max_steps=4, **options)
    results = train.train_and_evaluate(config, str(tmp_path / "full"))
    train.train_and_evaluate(tiny_config(data_dir, max_steps=2, **options), str(tmp_path / "cut"))
    train.train_and_evaluate(config, str(tmp_path / "cut"))
    step_a, params_a = latest_params(tmp_path / "full", config)
    step_b, params_b = latest_params(tmp_path / "cut", config)
    assert step_a == step_b == 4
    assert any(key.startswith("['ema']") for key in params_a)  # the average is checkpointed
    for key in params_a:
        np.testing.assert_allclose(params_a[key], params_b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    evaluated = train.evaluate_checkpoint(config, str(tmp_path / "full"), "validation")
    assert evaluated["kl"]["accuracy"] == pytest.approx(results["validation"]["kl"]["accuracy"])


def test_the_unlabelled_pool_takes_the_unlabeled_split_only_when_asked(data_dir):
    from kpn_jax import parallel

    sizes = {}
    for use in (True, False):
        config = tiny_config(data_dir, **{"coherence.use_unlabeled_split": use})
        _, _, _, pool = train.load_training_data(config, parallel.make_mesh())
        sizes[use] = len(pool)
    assert sizes == {True: 48 + 16, False: 48}  # the training split, plus the unlabeled one
