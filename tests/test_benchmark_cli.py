"""benchmarks/train_step.py's command line: what an XLA flag sweep passes on to its runs."""

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("benchmark_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_sweep_drops_its_own_options_in_both_spellings(train_step):
    argv = ["--run_py_defaults", "--json", "/tmp/out.json", "--xla_flag_set=--a=1",
            "--xla_flag_set", "--b=2", "--steps=7", "--json=/tmp/other.json", "--warmup", "1"]
    assert train_step._without_options(argv, ("--xla_flag_set", "--json")) == [
        "--run_py_defaults", "--steps=7", "--warmup", "1"]


def test_an_option_that_only_starts_like_a_dropped_one_is_kept(train_step):
    assert train_step._without_options(["--jsonl=x", "--json_out", "y"], ("--json",)) == [
        "--jsonl=x", "--json_out", "y"]


def test_make_config_sets_the_kernels_and_runner_names_say_what_ran(train_step):
    """--kernels reaches the config; the runner name says what 'auto' chose."""
    from kpn_jax import kernels

    default = train_step.make_config(18, 8, 64, 4, 2, "float32", "keypoints")
    assert default.model.kernels == "auto"
    cpu_kernels = kernels.choose("cpu", "cpu", onednn_availability=lambda: (False, ""))
    assert train_step._jax_runner_name(default, cpu_kernels) == "jax[auto=cpu]"
    xla = train_step.make_config(18, 8, 64, 4, 2, "float32", "keypoints", True, "xla")
    assert train_step._jax_runner_name(xla, kernels.XLA_KERNELS) == "jax[xla]"


def test_flop_count_of_a_strided_convolution_and_its_onednn_calls(train_step):
    """jaxpr_flops counts a strided convolution's input gradient as the forward
    convolution's multiply-adds (not over the zero-dilated map), the weight gradient the
    same, no input gradient that nothing reads, and kpn_jax.cpu.onednn's custom calls as
    the convolutions they replace."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kpn_jax.cpu import onednn as native

    x = jnp.ones((2, 10, 10, 4), jnp.float32)
    kernel = jnp.ones((3, 3, 4, 6), jnp.float32)

    def xla(x, kernel):
        return jnp.sum(jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")))

    def onednn(x, kernel):
        return jnp.sum(native.convolution(x, kernel, 2, 1))

    forward = 2 * (2 * 5 * 5 * 6) * 9 * 4          # y [2, 5, 5, 6], 9 * 4 MACs each
    input_grad = forward                           # each dy element meets 9 x 4 weights
    weight_grad = forward                          # the same products, summed over pixels
    functions = (xla, onednn) if native.availability()[0] else (xla,)
    for argnums, want in (((0, 1), forward + input_grad + weight_grad),
                          (1, forward + weight_grad)):
        counts = [train_step.jaxpr_flops(
            jax.make_jaxpr(jax.value_and_grad(f, argnums))(x, kernel)) for f in functions]
        np.testing.assert_array_equal(counts, [want] * len(functions))


@pytest.mark.slow
def test_gpu_end_to_end_script_runs_on_the_cpu_with_tiny_settings(tmp_path):
    """benchmarks/gpu_end_to_end.sh cannot rot: its whole path, at toy sizes on the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_end_to_end.sh"
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", STEPS="4",
               DTYPES="float32", IMAGE_SIZE="64", LABELED="4", UNLABELED="4", DEPTH="18",
               WIDTH="8", NUM_TRAIN="32", NUM_EVAL="8", LOG_EVERY="2", PURE_STEPS="1",
               DATA_THREADS="2")
    result = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    header, row = result.stdout.strip().splitlines()[-2:]
    assert header.startswith("dtype") and "input wait" in header
    cells = row.split()
    assert cells[0] == "float32" and float(cells[1]) > 0 and float(cells[2]) > 0
    assert float(cells[-2]) > 0 and float(cells[-1]) > 0    # host cores, peak MB: sampled


@pytest.mark.slow
def test_oai_build_benchmark_runs_on_a_small_tree(tmp_path):
    """benchmarks/oai_build.py end to end on 2 small films (so that the script cannot rot)."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_oai_build", pathlib.Path(__file__).parents[1] / "benchmarks" / "oai_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main([f"--tree={tmp_path / 'tree'}", "--films=2", "--film_size=600,800",
                          "--spacing=0.5", "--num_workers=0", "--detector_knees=2"])
    files, detection = report["results"]
    assert files["route"] == "files" and files["knees_written"] == 4
    assert detection["route"] == "detector search" and detection["knees"] == 2
