"""Train-step and eval-step speed: kpn-jax vs the PyTorch reference, back to back in one run.

The kpn-jax step is the one training uses (``kpn_jax.train.make_train_step`` on a
``configs/default.py`` config): on-device augmentation (random affine of images and
keypoints), forward, weighted cross entropy + GMM incoherence loss, backward, Adam
with L2 weight decay. The PyTorch step does the same work with the reference model
(``kpn_jax.interop.torch_reference``): the same random affine with
``F.affine_grid``/``F.grid_sample``, ``TorchKPN`` forward, ``torch_total_loss``,
backward and ``torch.optim.Adam(weight_decay=...)`` (``make_torch_train_step``).
``torch_compile`` runs the same step with ``torch.compile`` on the model and on the
augmentation. Every framework starts from its own random initialisation; speed does
not depend on the weights.

Each runner is built and warmed up first (compilation is reported separately), then
the timed steps are INTERLEAVED: round ``r`` times step ``r`` of every runner in
turn, so a change of the machine's load during the run hits all runners alike and
the ratios stay fair on a shared machine. The reported time is the median over the
rounds. Batches are placed on the device before timing (the host input pipeline is
measured by ``benchmarks/input_pipeline.py``).

Examples::

    python benchmarks/train_step.py                              # ResNet-50 KPN+CL, 320 px, batch 8
    python benchmarks/train_step.py --kernels=auto,xla,cpu --frameworks=jax,torch
    python benchmarks/train_step.py --dtype=bfloat16 --mode=eval --json=/tmp/r.json
    python benchmarks/train_step.py --what=conv1x1                # 1x1-conv weight gradient alone
    python benchmarks/train_step.py --frameworks=jax \
        --xla_flag_set="" --xla_flag_set="--xla_cpu_multi_thread_eigen=false"  # XLA flag sweep

``--batch_size`` counts all images of a step; the first ``--labeled`` of them (default
half, as in ``configs/default.py``'s 48 labelled + 48 unlabelled) carry grades.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/train_step.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

FRAMEWORKS = ("jax", "torch", "torch_compile")
MODES = ("train", "eval")
NUM_KEYPOINTS = 16  # kneel16
PAPER_IMAGE_SIZE = 320


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, load, versions, flags, accelerators."""
    cpu_model = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(), "cpu_model": cpu_model,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    import jax

    info["jax"] = jax.__version__
    info["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    return info


def restrict_cpus(num_cpus: int) -> set[int]:
    """Limits this process to its first ``num_cpus`` CPUs; returns the CPUs it had.

    XLA sizes its CPU thread pools by the CPUs the process may run on when the client
    starts (``tsl::port::MaxParallelism``); it has no thread-count flag. So
    ``--jax_threads`` starts JAX under this restriction and :func:`restore_cpus` lifts
    it once the pools exist: the step then runs on that many threads, free to move to
    any core.
    """
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(original)[:num_cpus])
    return original


def restore_cpus(cpus: set[int]) -> None:
    """Gives every thread of this process (Linux: /proc/self/task) the CPUs ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended meanwhile
            pass


# ----------------------------------------------------------------------------- inputs


def random_grades(num: int, seed: int) -> np.ndarray:
    """Loosely coherent random grades (OARSI around KL - 1): GMM and class-weight inputs."""
    from kpn_jax import grades as grades_lib

    rng = np.random.default_rng(seed)
    kl = rng.integers(0, 5, num)
    oarsi = [np.clip(kl - 1 + rng.integers(-1, 2, num), 0, 3) for _ in grades_lib.OARSI_TASKS]
    return np.stack([kl] + oarsi, 1).astype(np.int32)


def synthetic_batch(batch_size: int, labeled: int, image_size: int, seed: int = 0) -> dict:
    """A training batch in the pipeline's format; the first ``labeled`` examples carry grades.

    ``image`` uint8 [B, H, W, 1], ``keypoints`` float32 [B, 16, 2] inside the
    central 60 % of the image (where a knee's joint lies), ``grades`` int32 [B, 7]
    (-1 for the unlabelled rest), ``labeled`` bool [B].
    """
    rng = np.random.default_rng(seed)
    grades = random_grades(batch_size, seed)
    grades[labeled:] = -1
    return {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size, 1), dtype=np.uint8),
        "keypoints": rng.uniform(0.2 * image_size, 0.8 * image_size,
                                 (batch_size, NUM_KEYPOINTS, 2)).astype(np.float32),
        "grades": grades,
        "labeled": np.arange(batch_size) < labeled,
    }


def make_config(depth: int, width: int, image_size: int, batch_size: int, labeled: int,
                dtype: str, pooling: str, coherence: bool = True, kernels: str = "auto"):
    """``configs/default.py`` (the paper) with the benchmark's sizes.

    The augmentation's translation keeps the paper's 10 px at 320 px in proportion.
    """
    from configs import default

    config = default.get_config()
    config.model.update(dict(depth=depth, width=width, pooling=pooling, kernels=kernels))
    config.dtype = dtype
    config.batch_size = labeled
    config.unlabeled_batch_size = batch_size - labeled
    config.coherence.enabled = coherence
    config.augment.max_translation_px = 10.0 * image_size / PAPER_IMAGE_SIZE
    return config


# ----------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Runner:
    """One benchmarked step: ``run()`` executes one step and waits for its result."""

    name: str
    framework: str
    mode: str
    run: Callable[[], None]
    setup_seconds: float  # building + compiling + the first step
    flops_per_step: float | None = None  # XLA's count for the compiled step (jax only)
    model_flops_per_step: float | None = None  # jaxpr_flops of the step (jax only)
    times: list[float] = dataclasses.field(default_factory=list)


def _xla_flops(compiled) -> float | None:
    """FLOPs of a compiled XLA computation by XLA's cost analysis (None if unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def jaxpr_flops(closed_jaxpr) -> float:
    """FLOPs of the convolutions and matrix products in a jaxpr (2 per multiply-add),
    nested jaxprs included: the model FLOPs of a step as written, counted independently
    of any compiler. Elementwise work (BatchNorm, activations, Adam) is not counted, as
    in the usual model-FLOP-utilisation convention. A strided convolution's input
    gradient (a convolution of the zero-dilated output gradient) is counted as the forward
    convolution's multiply-adds, not over the inserted zeros. Work whose result nothing
    reads (a custom gradient's unused input gradient) is removed first."""
    from jax._src.interpreters import partial_eval as pe

    jaxpr = closed_jaxpr.jaxpr
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    total = 0.0
    for eqn in _jaxpr_eqns(jaxpr):
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            kernel_spatial = int(np.prod([rhs[d] for d in rhs_spec[2:]]))
            if any(d > 1 for d in eqn.params.get("lhs_dilation") or ()):
                # Each real input element meets each kernel tap once per output channel;
                # the zeros between them multiply nothing.
                total += (2.0 * int(np.prod(eqn.invars[0].aval.shape)) * kernel_spatial
                          * rhs[rhs_spec[0]])
            else:
                total += (2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * kernel_spatial
                          * rhs[rhs_spec[1]])
        elif name == "ffi_call" and str(eqn.params.get("target_name", "")).startswith(
                "kpn_onednn_conv_"):
            total += _onednn_conv_flops(str(eqn.params["target_name"]),
                                        [v.aval.shape for v in eqn.invars],
                                        eqn.outvars[0].aval.shape)
        elif name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs[d] for d in contract_lhs])) if contract_lhs else 1
            total += 2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
    return total


def _onednn_conv_flops(target: str, in_shapes: list, out_shape) -> float:
    """FLOPs of one of kpn_jax.cpu.onednn's custom calls, counted as jaxpr_flops counts
    the ``conv_general_dilated`` it replaces (each the forward convolution's multiply-adds)."""
    if target.endswith("_forward"):  # (x, kernel) -> y
        kh, kw, cin, _ = in_shapes[1]
        return 2.0 * int(np.prod(out_shape)) * kh * kw * cin
    if target.endswith("_backward_data"):  # (dy, kernel) -> dx
        kh, kw, cin, _ = in_shapes[1]
        return 2.0 * int(np.prod(in_shapes[0])) * kh * kw * cin
    kh, kw, cin, _ = out_shape  # backward_weights: (x, dy) -> dkernel
    return 2.0 * int(np.prod(in_shapes[1])) * kh * kw * cin


def _jaxpr_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations."""
    from jax.extend import core as jax_core

    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _jaxpr_eqns(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _jaxpr_eqns(sub)


def _jax_runner_name(config, kernels) -> str:
    """``jax[cpu]``; ``jax[auto=onednn]`` when ``model.kernels='auto'`` chose ``onednn``."""
    requested = config.model.kernels
    return f"jax[{kernels.name}]" if requested == kernels.name else f"jax[{requested}={kernels.name}]"


def jax_train_runner(config, batch_np: dict, image_size: int, gmm, class_weights) -> Runner:
    """kpn-jax's jitted train step (``kpn_jax.train.make_train_step``), state donated."""
    import jax
    import jax.numpy as jnp

    from kpn_jax import kernels as kernels_lib
    from kpn_jax import parallel, train, trainer

    start = time.perf_counter()
    mesh = parallel.make_mesh()
    kernels = kernels_lib.for_config(config)
    model = train.create_model(config, kernels=kernels)
    tx = train.make_optimizer(config, steps_per_epoch=1000)
    state = train.create_state(config, model, tx, image_size, NUM_KEYPOINTS, mesh)
    weights = {k: jnp.asarray(v) for k, v in class_weights.items()}
    step = train.make_train_step(config, model, weights, gmm if config.coherence.enabled else None,
                                 compiler_options=kernels.compiler_options)
    batch = parallel.global_batch(batch_np, mesh)
    health = parallel.replicate(trainer.initial_health(), mesh)
    step_index = jnp.asarray(0, jnp.int32)  # past the (zero) warm-up: the GMM term is on
    # Counted on the same step without compiler options (a jit with them cannot be nested).
    plain_step = train.make_train_step(config, model, weights,
                                       gmm if config.coherence.enabled else None)
    model_flops = jaxpr_flops(jax.make_jaxpr(plain_step)(state, batch, health, step_index))
    compiled = step.lower(state, batch, health, step_index).compile()
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics, _ = compiled(holder["state"], batch, health, step_index)
        jax.block_until_ready((holder["state"], metrics))

    run()
    name = _jax_runner_name(config, kernels)
    return Runner(name, "jax", "train", run, time.perf_counter() - start, _xla_flops(compiled),
                  model_flops)


def jax_eval_runner(config, batch_np: dict, image_size: int) -> Runner:
    """kpn-jax's jitted eval step (``kpn_jax.evaluate.make_eval_step``)."""
    import jax

    from kpn_jax import evaluate, parallel, train
    from kpn_jax import kernels as kernels_lib

    start = time.perf_counter()
    mesh = parallel.make_mesh()
    kernels = kernels_lib.for_config(config)
    model = train.create_model(config, kernels=kernels)
    variables = parallel.replicate(
        train.init_variables(model, image_size, NUM_KEYPOINTS, config.seed), mesh)
    step = evaluate.make_eval_step(model, tuple(config.tasks), train.DTYPES[config.dtype],
                                   kernels.compiler_options)
    batch = parallel.global_batch({k: batch_np[k] for k in ("image", "keypoints")}, mesh)
    plain_step = evaluate.make_eval_step(model, tuple(config.tasks), train.DTYPES[config.dtype])
    model_flops = jaxpr_flops(jax.make_jaxpr(plain_step)(variables, batch))
    compiled = step.lower(variables, batch).compile()

    def run() -> None:
        jax.block_until_ready(compiled(variables, batch))

    run()
    name = _jax_runner_name(config, kernels)
    return Runner(name, "jax", "eval", run, time.perf_counter() - start, _xla_flops(compiled),
                  model_flops)


def torch_affine_augment(images_u8, keypoints, max_translation_px: float,
                         max_rotation_deg: float, scale_range: Sequence[float]):
    """The random affine of ``kpn_jax.augment.augment`` in PyTorch (same distribution, same work).

    ``images_u8 [B, 1, H, W]`` uint8 -> float in [0, 1] warped with ``affine_grid`` /
    ``grid_sample`` (bilinear, zeros outside); ``keypoints [B, N, 2]`` move with the
    input->output pixel matrix ``out = S R (in - c) + c + t`` (c the image centre).
    """
    import torch

    batch = images_u8.shape[0]
    device = images_u8.device
    shift = (torch.rand(batch, 2, device=device) * 2 - 1) * max_translation_px
    angle = torch.deg2rad((torch.rand(batch, device=device) * 2 - 1) * max_rotation_deg)
    low, high = scale_range
    scale = low + torch.rand(batch, device=device) * (high - low)
    return torch_affine_warp(images_u8.float() / 255.0, keypoints, shift, angle, scale)


def torch_affine_warp(images, keypoints, shift, angle_rad, scale):
    """Warps ``images [B, C, H, W]`` and moves ``keypoints [B, N, 2]`` by the input->output
    pixel matrices of ``kpn_jax.augment.affine_matrices(shift, angle_rad, scale)``."""
    import torch
    import torch.nn.functional as F

    height, width = images.shape[-2:]
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    linear = scale[:, None, None] * torch.stack([torch.stack([cos, -sin], -1),
                                                 torch.stack([sin, cos], -1)], -2)   # [B, 2, 2]
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], device=images.device)
    offset = centre - linear @ centre + shift                                       # [B, 2]
    # grid_sample wants, per output pixel, the input position in align_corners=True
    # normalised coordinates n = a * p - 1 (a = 2 / (size - 1)): pixel centres 0 and
    # size - 1 at -1 and +1. So theta = diag(a) M^-1 diag(1/a), offset adjusted.
    inverse_linear = torch.linalg.inv(linear)
    inverse_offset = -(inverse_linear @ offset[:, :, None])[:, :, 0]
    to_norm = torch.tensor([2.0 / (width - 1), 2.0 / (height - 1)], device=images.device)
    theta_linear = to_norm[:, None] * inverse_linear / to_norm[None, :]
    theta_offset = to_norm * (inverse_offset + (inverse_linear / to_norm).sum(-1)) - 1.0
    theta = torch.cat([theta_linear, theta_offset[:, :, None]], dim=-1)             # [B, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    moved = torch.einsum("bij,bnj->bni", linear, keypoints) + offset[:, None, :]
    return warped, moved


def _torch_device():
    """The GPU when there is one (cuDNN autotuning on, as XLA autotunes; TF32 for float32
    products, as XLA's default precision uses on GPU), else the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def _torch_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_model(config, device):
    from kpn_jax.interop import torch_reference as tr

    m = config.model
    return tr.TorchKPN(depth=m.depth, width=m.width, tasks=tuple(config.tasks),
                       pooling=m.pooling, aggregation=m.aggregation,
                       feature_layer=m.feature_layer, input_mode=m.input_mode,
                       aux_regression=m.aux_regression).to(device)


def _torch_runner_name(compile_model: bool, threads: int | None) -> str:
    name = "torch_compile" if compile_model else "torch"
    return f"{name}[{threads} threads]" if threads else name


def _torch_batch(batch_np: dict, device) -> dict:
    import torch

    images = torch.from_numpy(batch_np["image"]).permute(0, 3, 1, 2).contiguous()
    return {"image": images.to(device),
            "keypoints": torch.from_numpy(batch_np["keypoints"]).to(device),
            "grades": torch.from_numpy(batch_np["grades"]).long().to(device),
            "labeled": torch.from_numpy(batch_np["labeled"]).to(device)}


def torch_train_runner(config, batch_np: dict, gmm, class_weights, compile_model: bool,
                       threads: int | None) -> Runner:
    """The PyTorch reference train step (eager, or with ``torch.compile``)."""
    import torch

    from kpn_jax.interop import torch_reference as tr

    start = time.perf_counter()
    device = _torch_device()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = _torch_model(config, device)
    t_gmm = tr.TorchGMM.from_gmm(gmm).to(device) if config.coherence.enabled else None
    autocast = torch.bfloat16 if config.dtype == "bfloat16" else None
    augment = torch_affine_augment
    forward_model = model
    if compile_model:
        forward_model = torch.compile(model)
        augment = torch.compile(torch_affine_augment)
    step = tr.make_torch_train_step(
        forward_model, t_gmm, class_weights, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, tau=config.coherence.tau,
        lambda_cls=config.lambda_cls, lambda_gmm=config.coherence.lambda_gmm,
        autocast_dtype=autocast)
    batch = _torch_batch(batch_np, device)
    aug = config.augment

    def run() -> None:
        if threads:
            torch.set_num_threads(threads)
        images, keypoints = augment(batch["image"], batch["keypoints"], aug.max_translation_px,
                                    aug.max_rotation_deg, tuple(aug.scale_range))
        step(images, keypoints, batch["grades"], batch["labeled"], use_gmm=True)
        _torch_sync(device)

    run()
    name = _torch_runner_name(compile_model, threads)
    return Runner(name, "torch_compile" if compile_model else "torch", "train", run,
                  time.perf_counter() - start)


def torch_eval_runner(config, batch_np: dict, compile_model: bool, threads: int | None) -> Runner:
    """PyTorch inference: eval-mode forward, softmaxes and argmax grades, no autograd."""
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    device = _torch_device()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = _torch_model(config, device).eval()
    forward_model = torch.compile(model) if compile_model else model
    autocast = config.dtype == "bfloat16"
    batch = _torch_batch(batch_np, device)
    tasks = tuple(config.tasks)

    def run() -> None:
        if threads:
            torch.set_num_threads(threads)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=autocast):
            outputs = forward_model(batch["image"].float() / 255.0, batch["keypoints"])
            probabilities = torch.cat([F.softmax(outputs[t].float(), -1) for t in tasks], -1)
            predicted = torch.stack([outputs[t].argmax(-1) for t in tasks], -1)
        del probabilities, predicted
        _torch_sync(device)

    run()
    name = _torch_runner_name(compile_model, threads)
    return Runner(name, "torch_compile" if compile_model else "torch", "eval", run,
                  time.perf_counter() - start)


# ----------------------------------------------------------------------------- timing


def time_interleaved(runners: Sequence[Runner], warmup: int, steps: int) -> None:
    """``warmup`` untimed steps of each runner, then ``steps`` rounds, one timed step each."""
    for runner in runners:
        for _ in range(warmup):
            runner.run()
    for _ in range(steps):
        for runner in runners:
            start = time.perf_counter()
            runner.run()
            runner.times.append(time.perf_counter() - start)


def summarise(runner: Runner, batch_size: int) -> dict[str, Any]:
    median = statistics.median(runner.times)
    result = {"name": runner.name, "framework": runner.framework, "mode": runner.mode,
              "median_step_s": round(median, 5), "images_per_s": round(batch_size / median, 3),
              "step_s": [round(t, 5) for t in runner.times],
              "setup_s": round(runner.setup_seconds, 2)}
    if runner.flops_per_step:
        result["xla_flops_per_step"] = runner.flops_per_step
    if runner.model_flops_per_step:
        result["model_flops_per_step"] = runner.model_flops_per_step
    return result


def add_flop_utilisation(results: list[dict], flops_by_mode: dict[str, float],
                         peak_flops: float | None) -> None:
    """Achieved FLOP/s from the model FLOPs of the jax step (:func:`jaxpr_flops`; the same
    model work for every framework), and the model FLOP utilisation against ``peak_flops``."""
    for result in results:
        flops = flops_by_mode.get(result["mode"])
        if not flops:
            continue
        achieved = flops / result["median_step_s"]
        result["achieved_tflops"] = round(achieved / 1e12, 4)
        if peak_flops:
            result["mfu"] = round(achieved / peak_flops, 4)


def add_ratios(results: list[dict]) -> None:
    """``ratio``: images/s over that of the first PyTorch eager runner of the same mode."""
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode and "images_per_s" in r]
        base = next((r for r in rows if r["framework"] == "torch"), None)
        for r in rows if base else ():
            r["ratio_to"] = base["name"]
            r["ratio"] = round(r["images_per_s"] / base["images_per_s"], 4)


# Dense peak FLOP/s by device name and compute dtype (float32 = TF32 tensor cores,
# which XLA and cuDNN use for float32 convolutions by default). From NVIDIA's data sheets.
GPU_PEAK_TFLOPS = {
    "H200": {"float32": 494.7, "bfloat16": 989.4},
    "H100 80GB HBM3": {"float32": 494.7, "bfloat16": 989.4},   # SXM
    "H100 NVL": {"float32": 417.5, "bfloat16": 835.0},
    "H100 PCIe": {"float32": 378.0, "bfloat16": 756.0},
    "A100": {"float32": 156.0, "bfloat16": 312.0},
}


def peak_flops_for(device_kind: str, dtype: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for name, peaks in GPU_PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return peaks[dtype] * 1e12
    return None


# ----------------------------------------------------------------------------- 1x1 conv


def conv1x1_microbenchmark(batch: int, image_size: int, steps: int, warmup: int,
                           restricted_cpus: set[int] | None = None) -> list[dict]:
    """Single 1x1 convolutions at ResNet-50 shapes, ``lax.conv_general_dilated`` vs the
    same product as an einsum: forward, gradient w.r.t. the input, w.r.t. the weight
    (each of ``sum(y ** 2)``, jitted on its own)."""
    import jax
    import jax.numpy as jnp

    shapes = [  # (stage, spatial size at image_size, in channels, out channels)
        ("layer1 conv1", image_size // 4, 256, 64), ("layer1 conv3", image_size // 4, 64, 256),
        ("layer2 conv3", image_size // 8, 128, 512), ("layer3 conv3", image_size // 16, 256, 1024),
        ("layer4 conv3", image_size // 32, 512, 2048)]

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def einsum(x, w):
        return jnp.einsum("bhwc,cd->bhwd", x, w[0, 0])

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) ** 2)

    parts = {"forward": lambda fn: jax.jit(fn),
             "input grad": lambda fn: jax.jit(jax.grad(loss(fn), argnums=0)),
             "weight grad": lambda fn: jax.jit(jax.grad(loss(fn), argnums=1))}
    runners = []
    for label, size, cin, cout in shapes:
        key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(key_x, (batch, size, size, cin), jnp.float32)
        w = jax.random.normal(key_w, (1, 1, cin, cout), jnp.float32) * 0.05
        for part, make in parts.items():
            for kind, fn in (("conv", conv), ("einsum", einsum)):
                compiled = make(fn)
                start = time.perf_counter()
                jax.block_until_ready(compiled(x, w))
                runners.append(Runner(f"{label} {size}x{size} {cin}->{cout} {part} [{kind}]",
                                      "jax", part,
                                      lambda g=compiled, x=x, w=w: jax.block_until_ready(g(x, w)),
                                      time.perf_counter() - start))
    if restricted_cpus:
        restore_cpus(restricted_cpus)
    time_interleaved(runners, warmup, steps)
    return [{"name": r.name, "median_ms": round(1e3 * statistics.median(r.times), 3)}
            for r in runners]


def _max_pool_reference(x):
    """The ResNet stem's pool as the model computes it: flax ``nn.max_pool`` (reduce_window)."""
    import flax.linen as nn

    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _make_max_pool_masked():
    """The CPU plug-in's stem pool, ``kpn_jax.cpu.pooling.max_pool``: the same forward with
    a custom gradient that routes each window's cotangent to its first maximum through
    strided masks, instead of XLA:CPU's expansion of select-and-scatter into a 5-output
    reduce-window over full-size iotas."""
    from kpn_jax.cpu import pooling

    return pooling.max_pool


def layers_microbenchmark(batch: int, image_size: int, steps: int, warmup: int,
                          restricted_cpus: set[int] | None = None) -> list[dict]:
    """The ResNet-50 layers XLA:CPU computes slowly: the 3x3 and
    stem 7x7 convolutions (forward; forward + input gradient; forward + weight gradient)
    and the stem max pool (forward + gradient), reduce_window vs the masked gradient."""
    import jax
    import jax.numpy as jnp

    def conv(x, w, stride):
        pad = w.shape[0] // 2
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    shapes = [("layer1 conv2 3x3", image_size // 4, 64, 64, 3, 1),
              ("layer2 conv2 3x3", image_size // 8, 128, 128, 3, 1),
              ("layer3 conv2 3x3", image_size // 16, 256, 256, 3, 1),
              ("stem conv1 7x7/2", image_size, 3, 64, 7, 2)]
    runners = []

    def add(name, fn, *args):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runners.append(Runner(name, "jax", "layer",
                              lambda: jax.block_until_ready(fn(*args)),
                              time.perf_counter() - start))

    for label, size, cin, cout, kernel, stride in shapes:
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, cin), jnp.float32)
        w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, cin, cout)) * 0.05

        def loss(x, w, stride=stride):
            return jnp.sum(conv(x, w, stride) ** 2)

        name = f"{label} {size}x{size} {cin}->{cout}"
        add(f"{name} forward", jax.jit(lambda x, w, stride=stride: conv(x, w, stride)), x, w)
        add(f"{name} input grad", jax.jit(jax.grad(loss, argnums=0)), x, w)
        add(f"{name} weight grad", jax.jit(jax.grad(loss, argnums=1)), x, w)
    pool_size = image_size // 2
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(2), (batch, pool_size, pool_size, 64)))
    x = jnp.round(x * 4) / 4  # ties, as after a ReLU, to exercise the tie rule
    weights = jax.random.normal(jax.random.PRNGKey(3), _max_pool_reference(x).shape)
    grads = {}
    for kind, pool in (("reduce_window", _max_pool_reference),
                       ("masked", _make_max_pool_masked())):
        fn = jax.jit(jax.value_and_grad(lambda x, pool=pool: jnp.sum(pool(x) * weights)))
        grads[kind] = fn(x)[1]
        add(f"stem max pool 3x3/2 {pool_size}x{pool_size}x64 forward + grad [{kind}]", fn, x)
    difference = float(jnp.max(jnp.abs(grads["masked"] - grads["reduce_window"])))
    if restricted_cpus:
        restore_cpus(restricted_cpus)
    time_interleaved(runners, warmup, steps)
    results = [{"name": r.name, "median_ms": round(1e3 * statistics.median(r.times), 3)}
               for r in runners]
    results.append({"name": "max pool gradients, max |masked - reduce_window|",
                    "value": difference})
    return results


# ----------------------------------------------------------------------------- main


def class_weights_and_gmm(config, seed: int):
    """The loss inputs every runner shares: class weights and the coherence GMM, both from
    2,000 random grade vectors."""
    from kpn_jax import gmm as gmm_lib
    from kpn_jax import losses

    train_grades = random_grades(2000, seed)
    class_weights = losses.class_weights(train_grades, tuple(config.tasks))
    gmm = gmm_lib.fit(train_grades, num_components=config.coherence.num_components,
                      sigma=config.coherence.sigma, seed=seed)
    return class_weights, gmm


def run_benchmark(args) -> dict[str, Any]:
    """Builds every requested runner, times them interleaved, returns the results."""
    labeled = args.labeled if args.labeled is not None else args.batch_size // 2
    frameworks = [f for f in args.frameworks.split(",") if f]
    conv_modes = [k for k in args.kernels.split(",") if k]
    modes = list(MODES) if args.mode == "both" else [args.mode]
    torch_threads = [int(t) for t in args.torch_threads.split(",") if t] or [None]
    coherence = not args.no_coherence
    batch_np = synthetic_batch(args.batch_size, labeled, args.image_size, args.seed)
    configs = {c: make_config(args.depth, args.width, args.image_size, args.batch_size, labeled,
                              args.dtype, args.pooling, coherence, c)
               for c in conv_modes}
    config = configs[conv_modes[0]]
    class_weights, gmm = class_weights_and_gmm(config, args.seed)

    info = machine_info()
    info["jax_threads"] = args.jax_threads or "all CPUs"
    print(f"# {info['date']}  {info['host_cpus']} CPUs ({info['cpu_model']}), load "
          f"{info['load_average_1_5_15']}, jax {info['jax']} on {info['jax_devices']}, "
          f"torch {info.get('torch')} ({info.get('torch_device', 'cpu')}, "
          f"{info.get('torch_threads')} threads), XLA_FLAGS={info['xla_flags']!r}, "
          f"GLIBC_TUNABLES={info['glibc_tunables']!r}, jax threads "
          f"{info['jax_threads']}", flush=True)
    print(f"# ResNet-{args.depth} (width {args.width}) {args.pooling} pooling"
          f"{' + CL' if coherence else ''}, {args.image_size} px, batch {args.batch_size} "
          f"({labeled} labelled), {args.dtype}; {args.warmup} warm-up + {args.steps} timed "
          f"steps, interleaved, median", flush=True)

    results, flops_by_mode = [], {}
    for mode in modes:
        runners = []
        for framework in frameworks:
            if framework == "jax":
                for c in conv_modes:
                    runner = (jax_train_runner(configs[c], batch_np, args.image_size, gmm,
                                               class_weights) if mode == "train"
                              else jax_eval_runner(configs[c], batch_np, args.image_size))
                    runners.append(runner)
                    if runner.model_flops_per_step:
                        flops_by_mode.setdefault(mode, runner.model_flops_per_step)
            elif framework in ("torch", "torch_compile"):
                for threads in torch_threads:
                    compile_model = framework == "torch_compile"
                    try:
                        runners.append(
                            torch_train_runner(config, batch_np, gmm, class_weights,
                                               compile_model, threads) if mode == "train"
                            else torch_eval_runner(config, batch_np, compile_model, threads))
                    except Exception as error:  # noqa: BLE001 -- torch.compile may not work here
                        if not compile_model:
                            raise
                        print(f"# torch.compile failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]}); skipped", flush=True)
                        results.append({"name": "torch_compile", "framework": "torch_compile",
                                        "mode": mode,
                                        "error": f"{type(error).__name__}: {error}"[:500]})
            else:
                raise ValueError(f"--frameworks: unknown {framework!r}; choose from {FRAMEWORKS}")
            built = [(r.name, round(r.setup_seconds, 1)) for r in runners]
            print(f"#   built {mode} runners (name, setup s): {built}", flush=True)
        if getattr(args, "restricted_cpus", None):
            restore_cpus(args.restricted_cpus)  # the pools exist now; see restrict_cpus
        time_interleaved(runners, args.warmup, args.steps)
        results += [summarise(r, args.batch_size) for r in runners]

    device_kind = info.get("torch_device") or info["jax_devices"][0]
    peak = peak_flops_for(device_kind, args.dtype, args.peak_tflops)
    add_flop_utilisation(results, flops_by_mode, peak)
    add_ratios(results)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"machine": info, "peak_tflops": peak / 1e12 if peak else None,
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("json", "xla_flag_set", "restricted_cpus")}
            | {"labeled": labeled}, "results": results}


def print_table(report: dict) -> None:
    results = [r for r in report["results"] if "error" not in r]
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        # Ratios are to the first PyTorch eager runner (the first --torch_threads value).
        base = next((r for r in rows if r["framework"] == "torch"), None)
        print(f"\n{mode} step (ratio to {base['name'] if base else '-'})")
        print(f"{'runner':<30} median s   images/s            ratio   setup s"
              + ("   TFLOP/s   MFU" if any("achieved_tflops" in r for r in rows) else ""))
        for r in rows:
            ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
            extra = ""
            if "achieved_tflops" in r:
                extra = f"   {r['achieved_tflops']:7.3f}"
                extra += f"   {r['mfu']:.3f}" if "mfu" in r else ""
            print(f"{r['name']:<30} {r['median_step_s']:9.3f} {r['images_per_s']:10.2f} "
                  f"{ratio:>16} {r['setup_s']:9.1f}{extra}")
    for mode in MODES:
        counted = [r for r in results if r["mode"] == mode and "model_flops_per_step" in r]
        if counted:
            xla = counted[0].get("xla_flops_per_step")
            print(f"# {mode} step: {counted[0]['model_flops_per_step'] / 1e9:.1f} GFLOP of "
                  f"convolutions and products (jaxpr count)"
                  + (f", {xla / 1e9:.1f} GFLOP by XLA's cost analysis" if xla else ""))
    print(f"# load average after: {report['machine']['load_average_after']}")


def _without_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the options ``names``, in either form (``--name=value`` or
    ``--name value``)."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in names:
            skip_value = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


def sweep_xla_flags(args, argv: Sequence[str]) -> dict[str, Any]:
    """Runs this benchmark once per ``--xla_flag_set`` in a fresh process (flags are read
    at start-up), one after the other; returns every run's report."""
    base_argv = _without_options(argv, ("--xla_flag_set", "--json"))
    reports = []
    for flags in args.xla_flag_set:
        env = dict(os.environ, XLA_FLAGS=flags)
        out = pathlib.Path(f"/tmp/kpn_train_step_sweep_{os.getpid()}_{len(reports)}.json")
        print(f"\n######## XLA_FLAGS={flags!r}", flush=True)
        subprocess.run([sys.executable, __file__, *base_argv, f"--json={out}"], env=env, check=True)
        reports.append(json.loads(out.read_text()))
        out.unlink()
    print("\n######## summary: images/s (ratio to the first torch eager runner of the run)")
    for report in reports:
        cells = ", ".join(f"{r['mode']} {r['name']} {r['images_per_s']:.2f}"
                          + (f" ({r['ratio']:.2f}x)" if "ratio" in r else "")
                          for r in report["results"] if "error" not in r)
        print(f"XLA_FLAGS={report['machine']['xla_flags']!r}: {cells}")
    return {"sweep": reports}


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="step", choices=("step", "conv1x1", "layers"),
                        help="'step': train/eval steps; 'conv1x1': 1x1 convolutions, conv vs "
                             "einsum; 'layers': 3x3/7x7 convolutions and the max pool")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--labeled", type=int, default=None,
                        help="labelled images per step (default: half the batch)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--pooling", default="keypoints", choices=("keypoints", "global"))
    parser.add_argument("--no_coherence", action="store_true",
                        help="drop the GMM incoherence loss (labelled-only baseline training)")
    parser.add_argument("--kernels", default="auto",
                        help="comma list of config.model.kernels values (one kpn-jax runner "
                             "each): auto, xla, cpu, onednn (kpn_jax/kernels.py)")
    parser.add_argument("--frameworks", default="jax,torch,torch_compile",
                        help=f"comma list from {FRAMEWORKS}")
    parser.add_argument("--mode", default="train", choices=(*MODES, "both"))
    parser.add_argument("--torch_threads", default="",
                        help="comma list of torch.set_num_threads values (one runner each)")
    parser.add_argument("--jax_threads", type=int, default=0,
                        help="size of XLA's CPU thread pools (default: one per CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU (default: known GPUs)")
    parser.add_argument("--xla_flag_set", action="append", default=None,
                        help="repeatable: run once per XLA_FLAGS value, each in a new process")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.restricted_cpus = None
    if args.jax_threads and not args.xla_flag_set:
        if "jax" in sys.modules:
            raise RuntimeError("--jax_threads must be applied before JAX is imported")
        args.restricted_cpus = restrict_cpus(args.jax_threads)
    if args.xla_flag_set:
        report = sweep_xla_flags(args, argv)
    elif args.what in ("conv1x1", "layers"):
        micro = conv1x1_microbenchmark if args.what == "conv1x1" else layers_microbenchmark
        report = {"machine": machine_info(),
                  "settings": {k: v for k, v in vars(args).items() if k != "restricted_cpus"},
                  "results": micro(args.batch_size, args.image_size, args.steps, args.warmup,
                                   args.restricted_cpus)}
        print(f"# {report['machine']['date']} load {report['machine']['load_average_1_5_15']}, "
              f"XLA_FLAGS={report['machine']['xla_flags']!r}; {args.what}, batch "
              f"{args.batch_size}, {args.image_size} px, median of {args.steps}")
        for r in report["results"]:
            value = f"{r['median_ms']:10.2f} ms" if "median_ms" in r else f"{r['value']:.3g}"
            print(f"{r['name']:<66} {value}")
    else:
        report = run_benchmark(args)
        print_table(report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
