"""KL grading on kneeKL224 (real OAI knee crops, 224 px) from scratch on a CPU.

Build the dataset once, then train:

  python -m data_prep.knee_kl224 --manual_dir=DIR --data_dir=~/tensorflow_datasets
  python run.py --config=configs/kneekl224.py --workdir=workdirs/kneekl224

A narrow ResNet-18 with global pooling and the KL head only (the set has no OARSI grades, so
no coherence learning), trained for 48 epochs with mirrored knees, grey-level changes
(contrast, brightness, gamma), a cosine schedule after a one-epoch warm-up, label smoothing
and a moving average of the weights, which is what validation, the best checkpoint and
predict use; each knee is evaluated with its mirror.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "knee_kl224/default"
    config.data_dir = "~/tensorflow_datasets"
    config.tasks = ("kl",)
    config.coherence.enabled = False
    config.model.update(dict(pooling="global", depth=18, width=16))
    config.class_weighting = "none"   # the plain accuracy, kappa and RMSE are the targets
    config.batch_size = 32
    config.eval_batch_size = 128
    config.num_epochs = 48
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.lr_schedule = "cosine"
    config.lr_warmup_epochs = 1.0
    config.label_smoothing = 0.1
    config.ema_decay = 0.999
    config.augment.update(dict(max_translation_px=8.0, max_rotation_deg=8.0,
                               scale_range=(0.92, 1.08), hflip=True,
                               # Without them 48 epochs overfit (docs/RESULTS.md section 5).
                               contrast=0.2, brightness=0.1, gamma=0.25))
    config.eval_hflip = True
    config.eval_every_epochs = 1.0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.best_metric = "validation/kl/accuracy"
    config.eval_split = "validation"
    config.method_name = "ResNet-18 w16 kneeKL224"
    return config
