"""configs/paper.py: every experiment of the paper as one parameterised config."""

import importlib.util
from pathlib import Path

import pytest

from configs import default, paper

REPO = Path(__file__).resolve().parents[1]


def _sweep_tables():
    spec = importlib.util.spec_from_file_location("sweep", REPO / "benchmarks" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TABLES


def test_defaults_are_the_proposed_method_at_the_paper_setting():
    config = paper.get_config("")
    assert config.model.depth == 50
    assert config.model.pooling == "keypoints"
    assert config.coherence.enabled
    assert config.coherence.tau == 0.5
    assert config.coherence.warmup_epochs == 1.0
    assert config.coherence.lambda_gmm == 1.0
    assert config.labeled_fraction == 1.0
    assert config.epoch_basis == "train"
    assert config.method_name == "ResNet-50 KPN+CL"
    # The paper setting keeps default.py's data and optimiser.
    base = default.get_config()
    assert config.learning_rate == base.learning_rate
    assert config.batch_size == base.batch_size


@pytest.mark.parametrize("arguments, expected", [
    ("arch=resnet18,kpn=0,cl=0", "ResNet-18"),
    ("arch=resnet34,kpn=0,cl=0", "ResNet-34"),
    ("kpn=1,cl=0", "ResNet-50 KPN"),
    ("kpn=0,cl=1", "ResNet-50 CL"),
    ("kpn=1,cl=1,labeled=0.2", "ResNet-50 KPN+CL 20% labels"),
    ("kpn=1,cl=1,tau=1.5", "ResNet-50 KPN+CL tau=1.5"),
    ("kpn=0,cl=0,aux=1", "ResNet-50 w. aux regression"),
    ("kpn=1,cl=1,warmup=4", "ResNet-50 KPN+CL warm-up 4 ep"),
    ("kpn=1,cl=1,lgmm=0.1", "ResNet-50 KPN+CL lambda_gmm=0.1"),
    # Coherence-only knobs do not rename a run without coherence learning.
    ("kpn=1,cl=0,warmup=4,lgmm=0.1,tau=1.5", "ResNet-50 KPN"),
])
def test_method_names(arguments, expected):
    assert paper.get_config(arguments).method_name == expected


def test_arguments_reach_the_config():
    config = paper.get_config("arch=resnet34,kpn=0,cl=1,labeled=0.4,tau=0.75,warmup=3,lgmm=0.25,"
                              "aux=1,seed=7")
    assert config.model.depth == 34
    assert config.model.pooling == "global"
    assert config.coherence.enabled
    assert config.labeled_fraction == 0.4
    assert config.coherence.tau == 0.75
    assert config.coherence.warmup_epochs == 3.0
    assert config.coherence.lambda_gmm == 0.25
    assert config.model.aux_regression
    assert config.seed == 7
    assert config.experiment == ("arch=resnet34,aux=1,cl=1,kpn=0,labeled=0.4,lgmm=0.25,seed=7,"
                                 "setting=paper,tau=0.75,warmup=3")


def test_cpu_setting_is_the_documented_one():
    config = paper.get_config("setting=cpu,arch=resnet18")
    assert config.synthetic.image_size == 96
    assert (config.synthetic.num_train, config.synthetic.num_unlabeled) == (1000, 1000)
    assert config.model.width == 16
    assert config.num_epochs == 12
    assert tuple(config.lr_decay_epochs) == (6, 10)


def test_regime_and_its_pretraining_use_disjoint_populations_of_the_same_knees():
    regime = paper.get_config("setting=regime,arch=resnet18,labeled=0.2,init=/w/b.safetensors")
    pretrain = paper.get_config("setting=pretrain,arch=resnet18,kpn=0,cl=0")
    assert regime.synthetic.num_train == 5000 and regime.labeled_fraction == 0.2
    # 1,000 labelled knees at 20 %; the pool (the other 4,000 + the ungraded) ten times that.
    labelled = regime.synthetic.num_train * regime.labeled_fraction
    assert (regime.synthetic.num_train - labelled + regime.synthetic.num_unlabeled) == 10 * labelled
    assert regime.init_from == "/w/b.safetensors" and "init=/w/b.safetensors" in regime.experiment
    assert (regime.coherence.lambda_gmm, regime.coherence.tau, regime.coherence.num_components,
            regime.coherence.sigma) == (1.0, 0.5, 10, 0.2)
    assert regime.synthetic.seed == 0 and pretrain.synthetic.seed == 1
    for key in ("image_size", "num_train"):
        assert regime.synthetic[key] == pretrain.synthetic[key]
    assert (regime.model.depth, regime.model.width) == (pretrain.model.depth, pretrain.model.width)
    assert pretrain.init_from == "" and "init" not in pretrain.experiment


@pytest.mark.parametrize("arguments, message", [
    ("arhc=resnet50", "bad argument 'arhc=resnet50'"),
    ("kpn", "bad argument 'kpn'"),
    ("arch=resnet101", "arch must be one of"),
    ("kpn=2", "kpn must be 0 or 1"),
    ("setting=gpu", "setting must be one of paper, cpu, regime, pretrain"),
    ("labeled=0", "labeled must be > 0"),
    ("labeled=1.5", "labeled is a fraction in (0, 1]"),
    ("labeled=half", "labeled must be a number"),
    ("tau=0", "tau must be > 0"),
    ("warmup=-1", "warmup must be >= 0"),
    ("lgmm=x", "lgmm must be a number"),
])
def test_bad_arguments_name_the_key(arguments, message):
    with pytest.raises(ValueError) as error:
        paper.get_config(arguments)
    assert message in str(error.value)
    assert "configs/paper.py" in str(error.value)


def test_every_sweep_table_row_is_a_valid_config():
    names = set()
    for table, rows in _sweep_tables().items():
        for row in rows:
            config = paper.get_config(f"setting=cpu,{row}")
            names.add((table, config.method_name))
        # Within a table, rows are told apart by their names (the report groups by name).
        assert len({n for t, n in names if t == table}) == len(rows), table
