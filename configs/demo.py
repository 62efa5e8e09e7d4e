"""The embedded default: a narrow ResNet-18 KPN + CL on 128 px synthetic knees.

Trains in minutes on a 2-core CPU (`make demo`). Same code path as the paper's
setting; only sizes shrink.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data_dir = "workdirs/data"
    config.synthetic.update(dict(image_size=128, num_train=1200, num_validation=300,
                                 num_test=300, num_unlabeled=600))
    config.model.update(dict(depth=18, width=16))
    config.batch_size = 32
    config.unlabeled_batch_size = 16
    config.eval_batch_size = 100
    config.num_epochs = 14
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.lr_decay_epochs = (7, 11)
    config.augment.max_translation_px = 4.0
    config.log_every_steps = 10
    config.eval_every_epochs = 2.0
    config.checkpoint_every_steps = 100
    return config
