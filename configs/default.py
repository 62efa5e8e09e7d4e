"""The paper's settings: ResNet-50 KPN + coherence learning, 320 px, batch 48, 60 epochs.

Run: python run.py --config=configs/default.py --workdir=DIR \
         --config.dataset=oai/default --config.data_dir=~/tensorflow_datasets
"""

import ml_collections

from kpn_jax import grades


def get_config():
    config = ml_collections.ConfigDict()

    # Data. 'synthetic_knee' builds the embedded synthetic dataset on first use
    # (parameters in config.synthetic); any other value names a built TFDS dataset
    # 'builder/config' under data_dir (see docs/DATASETS.md).
    config.dataset = "synthetic_knee"
    config.data_dir = "~/tensorflow_datasets"
    # With data_dir on gs://, datasets are read from a local copy made here once
    # (array_record reads local files; grain reads records at random).
    config.data_cache_dir = "~/.cache/kpn_jax/datasets"
    config.synthetic = ml_collections.ConfigDict(dict(
        image_size=320, num_train=2000, num_validation=500, num_test=500, num_unlabeled=2000,
        seed=0, rater_noise=0.1))
    config.tasks = grades.TASKS
    config.labeled_fraction = 1.0     # subject-level subsample of the labelled training set
    config.labeled_fraction_seed = 0  # the rest of the training set becomes unlabelled
    # What one epoch is (for num_epochs, lr_decay_epochs, warm-up): a pass over the
    # 'labeled' examples, or over the whole 'train' split, so that runs with fewer labels
    # take as many steps as runs with all of them (configs/paper.py uses 'train').
    config.epoch_basis = "labeled"
    # Reading the data: worker processes (-1 = auto: none on a CPU backend, else half the
    # CPUs, at most 4 per local accelerator; 0 = read in the training process) and threads
    # per process (0 = default: one per CPU, at most 8, in the training process; none in
    # a worker).
    config.num_data_workers = -1
    config.num_data_threads = 0

    # Model.
    config.model = ml_collections.ConfigDict(dict(
        pooling="keypoints",          # 'keypoints' (KPN) or 'global' (the ResNet baseline)
        depth=50,
        width=64,
        aggregation="concat",         # KPN: 'concat' (paper) or 'mean' over the points
        densify_k=0,                  # >0: resample each compartment to k points
        feature_layer="layer3",
        aux_regression=False,         # Antony et al.'s auxiliary regression head
        head="softmax",               # 'softmax' (a Dense per grade: the paper) or 'cumulative'
                                      # (ordinal: one score, ordered thresholds per grade)
        input_mode="repeat",          # 'repeat' grey -> 3 channels, or 'single' channel stem
        stem_max_pool=True,           # False: no max-pool after the stem convolution (every
                                      # feature map twice as fine, ~4x the multiply-adds)
        kernels="auto",               # 'auto', 'xla', 'cpu' or 'onednn': how convolutions run
                                      # (kpn_jax/kernels.py; same parameters, same numbers)
    ))
    config.dtype = "float32"          # compute dtype: 'float32' or 'bfloat16'
    # Matmul/convolution precision of float32 work: 'default' lets TPUs use bfloat16 passes
    # and NVIDIA GPUs TF32; 'highest' forces full float32 everywhere (slower on GPU/TPU, no
    # change on CPU). Coordinates and GMM densities are full float32 either way.
    config.matmul_precision = "default"
    config.init_from = ""             # torchvision ResNet weights (.pth/.safetensors) for the backbone

    # Losses (eq. 5): L = lambda_cls L_cls + lambda_gmm L_gmm.
    config.lambda_cls = 1.0
    config.class_weighting = "prevalence"  # 'prevalence' (the paper: N / (C n_c)) or 'none'
    config.aux_regression_weight = 1.0
    config.coherence = ml_collections.ConfigDict(dict(
        enabled=True, num_components=10, sigma=0.2, tau=0.5, lambda_gmm=1.0,
        warmup_epochs=1.0, gmm_seed=0,
        # Noisy copies of each labelled grade vector for EM; 0 = enough for >= 1,000
        # samples per component (1 at the paper's 11.6k knees; kpn_jax.gmm.auto_repeats).
        gmm_repeats=0,
        # The unlabelled pool: every training image, plus the dataset's 'unlabeled' split
        # when True (the paper's ungraded radiographs).
        use_unlabeled_split=True))

    # Optimisation (the paper: Adam, wd 1e-2, lr 1e-4 halved after epochs 10 and 30).
    config.batch_size = 48            # labelled examples per global batch
    config.unlabeled_batch_size = 48  # unlabelled examples per global batch (CL only)
    config.eval_batch_size = 64
    config.num_epochs = 60
    config.learning_rate = 1e-4
    config.weight_decay = 1e-2
    config.optimizer = "adam"         # 'adam' (paper) or 'sgd' (Nesterov momentum)
    config.momentum = 0.9             # SGD only
    config.weight_decay_style = "l2"  # 'l2' = torch Adam(weight_decay) (paper); 'decoupled' = AdamW
    config.lr_decay_epochs = (10, 30)
    config.lr_decay_factor = 0.5
    config.lr_schedule = "step"       # 'step' (x lr_decay_factor after lr_decay_epochs) or
                                      # 'cosine' (to 0 at the last epoch)
    config.lr_warmup_epochs = 0.0     # 'cosine': linear warm-up from 0 over these epochs
    config.label_smoothing = 0.0      # cross entropy against (1 - e) one-hot + e uniform
    # > 0: soft ordinal labels (SORD) instead of one-hot: the target of grade y is
    # softmax_k(-(k - y)^2 / (2 sigma^2)), mass on the neighbouring grades (0.4: 0.04 each).
    config.ordinal_label_sigma = 0.0
    # > 0: an exponential moving average of the weights (and BatchNorm statistics) with this
    # decay is what validation, the best checkpoint's tests and predict use.
    config.ema_decay = 0.0
    # > 0: mixup (Zhang et al. 2018) of the training images and their targets with a weight
    # drawn from Beta(mixup_alpha, mixup_alpha) per batch; global pooling without coherence.
    config.mixup_alpha = 0.0

    # Augmentation at 320 px (translation scales with image size).
    config.augment = ml_collections.ConfigDict(dict(
        max_translation_px=10.0, max_rotation_deg=5.0, scale_range=(0.95, 1.05),
        # Mirror half the examples: only for grades without a side (tasks=('kl',)); the
        # OARSI grades are lateral/medial, which a mirror would swap.
        hflip=False,
        contrast=0.0, brightness=0.0, gamma=0.0))  # grey levels: see kpn_jax.augment.adjust_intensity
    config.eval_hflip = False         # evaluate each knee and its mirror, average (KL only)

    # Bookkeeping.
    config.seed = 0
    config.log_every_steps = 50
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2
    config.best_metric = "auto"       # 'auto': OARSI average accuracy, or the first task's
                                      # accuracy when not all OARSI tasks are trained
    config.divergence_factor = 100.0  # stop when a step's loss exceeds this x the lowest (0: off)
    config.eval_split = "test"        # split for --mode=evaluate
    config.max_steps = 0              # >0 stops early (tests, smoke runs)
    config.method_name = "kpn-jax"   # row label in reports (configs/paper.py sets it)
    config.experiment = ""           # the family arguments that made this config, if any
    return config
