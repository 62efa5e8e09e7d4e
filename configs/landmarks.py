"""The kneel16 landmark detector: synthetic knees + real kneeKL224 keypoints.

  python run.py --config=configs/landmarks.py --workdir=workdirs/landmarks

Trains :class:`kpn_jax.models.landmarks.LandmarkNet` (narrow ResNet-18 trunk to
``layer3`` + top-down heatmap head + soft-argmax) on batches mixing the synthetic
knees (exact keypoints) and the kneeKL224 training images whose ``landmarks16.csv``
row has ``ok = 1`` (build it first: ``python -m data_prep.knee_kl224
--manual_dir=DIR --data_dir=workdirs/data``). A tenth of the
real training subjects is held out as ``dev`` to pick the best checkpoint, so the
kneeKL224 ``validation`` rows are only ever evaluated, never selected on.

Only examples whose keypoints are all valid and not themselves predicted
(``keypoints_predicted``) are used, for training and for evaluation.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "landmarks"          # run.py dispatches on this
    config.data_dir = "workdirs/data"
    config.keypoint_schema = "kneel16"

    # Training sources: name -> (dataset, split, examples per global batch, dev holdout).
    # batch_size = 0 switches a source off. 'synthetic_knee' is built on first use with
    # config.synthetic; any other dataset is a built TFDS 'builder/config' under data_dir.
    config.sources = ml_collections.ConfigDict({
        "synthetic": ml_collections.ConfigDict(dict(
            dataset="synthetic_knee", split="train", batch_size=4, dev_fraction=0.0,
            eval_split="validation")),
        "real": ml_collections.ConfigDict(dict(
            dataset="knee_kl224/default", split="train", batch_size=12, dev_fraction=0.1,
            eval_split="validation")),
    })
    # The synthetic knees, at the real crops' size so both can share one batch.
    config.synthetic = ml_collections.ConfigDict(dict(
        image_size=224, num_train=2000, num_validation=200, num_test=200,
        num_unlabeled=4,               # unused here; TFDS cannot write an empty split
        seed=0, rater_noise=0.1))
    config.dev_seed = 0                # which subjects form the dev holdout

    # Model.
    config.model = ml_collections.ConfigDict(dict(
        depth=18, width=24, stages=3,  # trunk up to layer3 (stride 16)
        head_channels=32,
        input_mode="single",
        kernels="auto",                # see configs/default.py
        input_size=160,                # images are resized to this on device (0 = as stored);
                                       # 160 keeps a 2-core CPU run near an hour
    ))
    config.dtype = "float32"
    config.matmul_precision = "default"   # or 'highest' (see configs/default.py)

    # Loss: coordinate loss on the soft-argmax + KL to a Gaussian target map.
    config.loss = ml_collections.ConfigDict(dict(
        coord="l1", heatmap_weight=1.0, sigma_cells=1.0))

    # Optimisation: AdamW, linear warm-up then cosine decay.
    config.num_steps = 3000
    config.learning_rate = 2e-3
    config.warmup_steps = 100
    config.weight_decay = 1e-4
    config.grad_clip_norm = 1.0
    config.eval_batch_size = 32

    # On-device augmentation at the stored size (224 px): geometry, then intensity.
    config.augment = ml_collections.ConfigDict(dict(
        max_translation_px=16.0, max_rotation_deg=10.0, scale_range=(0.9, 1.1),
        brightness=0.1, contrast=(0.75, 1.25), gamma=(0.7, 1.4), noise_std=0.02))

    # Bookkeeping.
    config.seed = 0
    config.num_data_workers = -1   # see configs/default.py
    config.num_data_threads = 2
    config.log_every_steps = 25
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.keep_checkpoints = 2
    config.best_metric = "dev/real/mean"   # lower is better; '' = keep the last step
    config.eval_sets = ("dev", "eval")      # final report: dev holdout and each eval_split
    config.montage_images = 16
    return config
