"""Every experiment of the paper as one parameterised config.

  --config=configs/paper.py:arch=resnet50,kpn=1,cl=1,labeled=0.2,tau=0.5,aux=0,seed=0

Keys (all optional):
  arch     resnet18 | resnet34 | resnet50                      (default resnet50)
  kpn      1 = keypoint pooling (KPN), 0 = global average pooling baseline   (1)
  cl       1 = coherence learning (GMM incoherence loss + unlabelled data)   (1)
  labeled  fraction of the labelled training subjects kept as labelled; the
           rest become unlabelled (Table 4: 0.2, 0.4, 1.0)                    (1.0)
  tau      incoherence-loss temperature (supplementary Table 1)              (0.5)
  aux      1 = Antony et al.'s auxiliary regression head (suppl. Table 2)    (0)
  warmup   epochs of classification-only training before the incoherence
           loss starts (the paper: 1)                                       (1)
  lgmm     lambda_gmm, the weight of the incoherence loss in eq. 5          (1)
  pool     CL's unlabelled pool: all = the training split and the dataset's
           'unlabeled' split; train = the training split only               (all)
  seed     training seed (the labelled subset's seed stays fixed)            (0)
  setting  paper = docs/DESIGN.md section 1 on config.dataset (default: synthetic
           knees at 320 px); cpu = the CPU-sized synthetic setting of
           docs/RESULTS.md; regime = Table 4 scaled toward the paper (5,000
           training knees, so 1,000 labelled at 20 % and an unlabelled pool ten
           times that, 128 px, from a pretrained backbone: init=); pretrain = the
           regime's backbone trained with every label on a disjoint synthetic
           population (another seed)                                          (paper)
  init     backbone weights to start from (torchvision layout, .safetensors or
           .pth; benchmarks/export_backbone.py writes them from a workdir)   ('')

Paper rows: Table 2 baselines = kpn=0,cl=0 with arch=resnet18/34/50; the proposed
method = kpn=1,cl=1; Table 3 ablation = kpn x cl; Table 4 = labeled x {kpn=0,cl=0 |
kpn=1,cl=1}; tau sweep = tau in {0.25,0.5,0.75,1.0,1.5}; aux = aux=1.
"""

from configs import default

DEFAULTS = dict(arch="resnet50", kpn="1", cl="1", labeled="1.0", tau="0.5", aux="0", seed="0",
                setting="paper", warmup="1", lgmm="1", init="", pool="all")
SETTINGS = ("paper", "cpu", "regime", "pretrain")
ARCH_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


def parse_arguments(config_string: str | None) -> dict:
    """``'a=1,b=2'`` -> dict over :data:`DEFAULTS`; unknown keys or values are errors."""
    args = dict(DEFAULTS)
    for item in filter(None, (config_string or "").split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in DEFAULTS:
            raise ValueError(f"configs/paper.py: bad argument {item!r}; keys are {sorted(DEFAULTS)}")
        args[key] = value
    if args["arch"] not in ARCH_DEPTH:
        raise ValueError(f"configs/paper.py: arch must be one of {sorted(ARCH_DEPTH)}, got {args['arch']!r}")
    for key in ("kpn", "cl", "aux"):
        if args[key] not in ("0", "1"):
            raise ValueError(f"configs/paper.py: {key} must be 0 or 1, got {args[key]!r}")
    if args["pool"] not in ("all", "train"):
        raise ValueError(f"configs/paper.py: pool must be all or train, got {args['pool']!r}")
    if args["setting"] not in SETTINGS:
        raise ValueError(f"configs/paper.py: setting must be one of {', '.join(SETTINGS)}, got "
                         f"{args['setting']!r}")
    for key, zero_allowed in (("labeled", False), ("tau", False), ("warmup", True), ("lgmm", True)):
        try:
            value = float(args[key])
        except ValueError:
            raise ValueError(f"configs/paper.py: {key} must be a number, got {args[key]!r}") from None
        if not (value > 0 or (zero_allowed and value == 0)):   # NaN fails both
            raise ValueError(f"configs/paper.py: {key} must be {'>= 0' if zero_allowed else '> 0'}, "
                             f"got {args[key]!r}")
    if float(args["labeled"]) > 1:
        raise ValueError(f"configs/paper.py: labeled is a fraction in (0, 1], got {args['labeled']!r}")
    return args


def method_name(args: dict) -> str:
    """A row label in the paper's words, e.g. 'ResNet-50 KPN+CL 20%'."""
    parts = [f"ResNet-{ARCH_DEPTH[args['arch']]}"]
    if args["kpn"] == "1" or args["cl"] == "1":
        parts.append("+".join(p for p, on in (("KPN", args["kpn"]), ("CL", args["cl"])) if on == "1"))
    if float(args["labeled"]) < 1.0:
        parts.append(f"{float(args['labeled']):.0%} labels")
    if args["cl"] == "1" and float(args["tau"]) != 0.5:
        parts.append(f"tau={float(args['tau']):g}")
    if args["cl"] == "1" and float(args["warmup"]) != 1.0:
        parts.append(f"warm-up {float(args['warmup']):g} ep")
    if args["cl"] == "1" and float(args["lgmm"]) != 1.0:
        parts.append(f"lambda_gmm={float(args['lgmm']):g}")
    if args["cl"] == "1" and args["pool"] != "all":
        parts.append(f"pool {args['pool']}")
    if args["aux"] == "1":
        parts.append("w. aux regression")
    return " ".join(parts)


def cpu_setting(config):
    """The CPU-sized synthetic setting of docs/RESULTS.md (minutes per run on 2 cores)."""
    config.synthetic.update(dict(image_size=96, num_train=1000, num_validation=300, num_test=500,
                                 num_unlabeled=1000, seed=0))
    config.data_dir = "workdirs/data"
    config.model.width = 16
    config.batch_size = 32
    config.unlabeled_batch_size = 32
    config.eval_batch_size = 100
    config.num_epochs = 12
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.lr_decay_epochs = (6, 10)
    config.augment.max_translation_px = 3.0
    config.log_every_steps = 20
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 200
    return config


def regime_setting(config, population_seed: int = 0):
    """Table 4 scaled toward the paper on a CPU: 5,000 training knees (1,000 labelled at
    20 %, the other 4,000 and 6,000 more ungraded ones the unlabelled pool: ten times the
    labelled set), 128 px, a narrow ResNet-18 from a backbone trained elsewhere
    (``config.init_from``), 12 epochs over the training split (about 1,900 steps at any
    labelled fraction); the paper's CL settings (lambda_gmm 1, tau 0.5, K 10, sigma 0.2,
    one epoch of warm-up). ``population_seed`` picks the synthetic population."""
    config = cpu_setting(config)  # its optimiser, batch sizes and schedule; larger data
    config.synthetic.update(dict(image_size=128, num_train=5000, num_validation=500,
                                 num_test=1000, num_unlabeled=6000, seed=population_seed))
    config.augment.max_translation_px = 4.0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    return config


def pretrain_setting(config):
    """The regime's backbone, trained with every label on another synthetic population
    (seed 1: other subjects, none of them in any split of the regime's seed-0 population);
    what ImageNet weights are to the paper."""
    config = regime_setting(config, population_seed=1)
    config.synthetic.num_unlabeled = 16  # not used (no coherence learning)
    return config


def get_config(config_string: str | None = None):
    args = parse_arguments(config_string)
    config = default.get_config()
    if args["setting"] == "cpu":
        config = cpu_setting(config)
    elif args["setting"] == "regime":
        config = regime_setting(config)
    elif args["setting"] == "pretrain":
        config = pretrain_setting(config)
    config.init_from = args["init"]
    config.model.depth = ARCH_DEPTH[args["arch"]]
    config.model.pooling = "keypoints" if args["kpn"] == "1" else "global"
    config.coherence.enabled = args["cl"] == "1"
    config.coherence.tau = float(args["tau"])
    config.coherence.warmup_epochs = float(args["warmup"])
    config.coherence.lambda_gmm = float(args["lgmm"])
    config.coherence.use_unlabeled_split = args["pool"] == "all"
    config.labeled_fraction = float(args["labeled"])
    # Every labelled fraction trains for the same number of steps (an epoch = the whole
    # training split), so Table 4 compares labels, not training length.
    config.epoch_basis = "train"
    config.model.aux_regression = args["aux"] == "1"
    config.seed = int(args["seed"])
    config.method_name = method_name(args)
    # Keys at values from before they existed are left out, so older workdirs group alike.
    config.experiment = ",".join(f"{k}={v}" for k, v in sorted(args.items())
                                 if (v or k != "init") and not (k == "pool" and v == "all"))
    return config
