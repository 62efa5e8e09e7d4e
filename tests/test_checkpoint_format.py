"""A checkpoint written before the convolution became an injected module (when the model
had ``conv1x1``/``conv3x3`` string fields) restores into today's model and predicts the same.

``tests/data/checkpoint_r18w4`` holds that checkpoint (a ResNet-18 width-4 KPN, step 7), its
``config.json`` and the eval step's probabilities on a fixed batch, as written by the code of
that time.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kpn_jax import checkpointing, evaluate, kernels, parallel, train

FIXTURE = Path(__file__).parent / "data" / "checkpoint_r18w4"


@pytest.mark.slow
@pytest.mark.parametrize("kernel_choice", ["xla", "cpu"])
def test_a_checkpoint_of_the_string_mode_model_restores_and_predicts_the_same(kernel_choice,
                                                                            tmp_path):
    from configs import default

    workdir = shutil.copytree(FIXTURE / "workdir", tmp_path / "workdir")  # orbax writes beside it
    saved = json.loads((FIXTURE / "workdir" / "config.json").read_text())
    assert saved["model"]["conv1x1"] == "einsum"  # the old format indeed
    config = default.get_config()
    config.model.update(dict(depth=saved["model"]["depth"], width=saved["model"]["width"],
                             kernels=kernel_choice))
    checkpointing.check_config_compatible(saved, config)
    chosen = kernels.for_config(config)
    model = train.create_model(config, kernels=chosen)
    mesh = parallel.make_mesh()
    template = train.abstract_state(config, model, train.make_optimizer(config, 1), 32, 16, mesh)
    checkpoints = checkpointing.Checkpointer(workdir)
    try:
        state = checkpoints.restore(template)
    finally:
        checkpoints.close()
    assert int(state.step) == 7
    expected = np.load(FIXTURE / "expected.npz")
    step = evaluate.make_eval_step(model, tuple(config.tasks),
                                   compiler_options=chosen.compiler_options)
    _, probabilities = step({"params": state.params, "batch_stats": state.batch_stats},
                            {"image": expected["image"], "keypoints": expected["keypoints"]})
    np.testing.assert_allclose(np.asarray(probabilities), expected["probabilities"],
                               rtol=1e-4, atol=1e-5)
