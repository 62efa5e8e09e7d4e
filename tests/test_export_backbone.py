"""benchmarks/export_backbone.py: a workdir's backbone as the start of other runs
(configs/paper.py's init=), as its evaluation weights, heads left out."""

import importlib.util
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_exported_backbone_is_the_start_of_a_new_run(tmp_path):
    from configs import default
    from data_prep import synthetic_knee
    from kpn_jax import parallel, predict, train
    from kpn_jax.interop import torch_weights

    spec = importlib.util.spec_from_file_location("export_backbone",
                                                  REPO / "benchmarks" / "export_backbone.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    config = default.get_config()
    config.data_dir = str(tmp_path / "data")
    config.synthetic.update(dict(image_size=32, num_train=16, num_validation=8, num_test=8,
                                 num_unlabeled=8))
    config.model.update(dict(depth=18, width=4, pooling="global"))
    config.coherence.enabled = False
    config.batch_size = config.eval_batch_size = 8
    config.max_steps = 2
    config.ema_decay = 0.5  # the export is of the evaluation (averaged) weights
    synthetic_knee.build_for_config(config)
    train.train_and_evaluate(config, str(tmp_path / "pretrained"))
    out = tmp_path / "backbone.safetensors"
    written = script.export_backbone(tmp_path / "pretrained", out)
    assert written["depth"] == 18 and written["checkpoint"]["which"] == "best"

    _, evaluated, _ = predict.restore_variables(config, tmp_path / "pretrained", 32, "kneel16")
    loaded = torch_weights.load_backbone(str(out), 18)
    for collection in ("params", "batch_stats"):
        expected = evaluated[collection]["backbone"]
        assert "head_kl" not in loaded[collection]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     loaded[collection], expected)

    # A KPN run from it starts from those weights (up to its layer3).
    config.model.pooling = "keypoints"
    config.init_from = str(out)
    model = train.create_model(config)
    state = train.create_state(config, model, train.make_optimizer(config, 1), 32, 16,
                               parallel.make_mesh())
    np.testing.assert_array_equal(np.asarray(state.params["backbone"]["conv1"]["kernel"]),
                                  np.asarray(evaluated["params"]["backbone"]["conv1"]["kernel"]))
    assert "layer4_0" not in state.params["backbone"]
