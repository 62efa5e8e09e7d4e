"""oneDNN convolutions for XLA:CPU, built on first use.

On CPUs with AVX-512, XLA:CPU computes 3x3 and 7x7 convolutions and their gradients up
to 1.7x slower than oneDNN, the library PyTorch uses on CPU. :func:`convolution` runs
them through oneDNN instead, as XLA FFI custom
calls (``onednn_conv.cc``), with the same ``[B, H, W, C]`` / ``[kh, kw, in, out]``
arrays as ``lax.conv_general_dilated``.

The shared library is compiled once per source / jaxlib / oneDNN combination with the
system's C++ compiler (about 5 s) into ``$KPN_JAX_CACHE_DIR`` (default
``~/.cache/kpn_jax``), against jaxlib's FFI headers and the ``libdnnl`` of the
``onednn-cpu-gomp`` wheel (the ``cpu`` extra: ``pip install "kpn-jax[cpu]"``), then checked against ``lax.conv_general_dilated`` on a small
convolution (forward and both gradients) before it is used. :func:`availability` says
whether that worked and, if not, why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_HEADER = Path(__file__).with_name("dnnl_c_api.h")
_TARGETS = {
    "kpn_onednn_conv_forward": "KpnOneDnnConvForward",
    "kpn_onednn_conv_backward_data": "KpnOneDnnConvBackwardData",
    "kpn_onednn_conv_backward_weights": "KpnOneDnnConvBackwardWeights",
}
_LIBDNNL = "libdnnl.so.3"


class OneDnnUnavailable(RuntimeError):
    """oneDNN convolutions cannot be used in this process (the message says why)."""


def cache_dir() -> Path:
    """Where built libraries go: ``$KPN_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/kpn_jax``,
    else ``~/.cache/kpn_jax``."""
    if os.environ.get("KPN_JAX_CACHE_DIR"):
        return Path(os.environ["KPN_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kpn_jax"


def find_libdnnl() -> Path:
    """The directory holding oneDNN's ``libdnnl.so.3``: ``$KPN_JAX_ONEDNN_LIBDIR``, or the
    ``lib`` directory the ``onednn-cpu-gomp`` wheel installs into (this environment's
    prefix, or the user base for ``pip install --user``)."""
    if os.environ.get("KPN_JAX_ONEDNN_LIBDIR"):
        candidates = [Path(os.environ["KPN_JAX_ONEDNN_LIBDIR"])]
    else:
        candidates = [Path(sys.prefix) / "lib", Path(sysconfig.get_config_var("userbase") or
                                                     sys.prefix) / "lib"]
    for directory in candidates:
        if (directory / _LIBDNNL).is_file():
            return directory
    raise OneDnnUnavailable(
        f"{_LIBDNNL} not found in {', '.join(map(str, candidates))}: install the cpu "
        f"extra (pip install 'kpn-jax[cpu]', x86-64 Linux) or set KPN_JAX_ONEDNN_LIBDIR")


def _compiler() -> str:
    """``$CXX`` if set (it must exist), else ``c++`` or ``g++`` from ``PATH``."""
    if os.environ.get("CXX"):
        compiler = shutil.which(os.environ["CXX"])
        if compiler is None:
            raise OneDnnUnavailable(f"CXX={os.environ['CXX']!r}: no such compiler")
        return compiler
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OneDnnUnavailable("no C++ compiler found (install g++, or set CXX)")
    return compiler


def build(directory: Path | None = None) -> Path:
    """Compiles ``onednn_conv.cc`` unless already built; returns the shared library's path.

    The file name carries a hash of the sources, the jaxlib version and the oneDNN library
    it links, so an upgrade of either rebuilds. The library is written under a temporary
    name and renamed, so concurrent processes never load a half-written file.
    """
    if sys.platform != "linux":
        raise OneDnnUnavailable(f"oneDNN convolutions are built for Linux only, not {sys.platform}")
    libdir = find_libdnnl()
    compiler = _compiler()
    include_dir = jax.ffi.include_dir()
    libdnnl = (libdir / _LIBDNNL).resolve()
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), _HEADER.read_bytes(), importlib.metadata.version("jaxlib").encode(),
                 str(libdnnl).encode(), str(libdnnl.stat().st_size).encode(), compiler.encode()):
        digest.update(part)
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / f"kpn_onednn_conv-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / target.name
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC",
                   "-w", f"-I{_HEADER.parent}", f"-I{include_dir}", str(_SOURCE), "-o",
                   str(partial), f"-L{libdir}", f"-l:{_LIBDNNL}", f"-Wl,-rpath,{libdir}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OneDnnUnavailable(
                f"building {_SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
        os.replace(partial, target)
    return target


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _ffi(target: str, shape: tuple[int, ...], *operands: jax.Array, stride: int,
         padding: int) -> jax.Array:
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(
        *operands, stride=np.int64(stride), padding=np.int64(padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _convolution(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    batch, height, width, _ = x.shape
    kernel_h, kernel_w, _, out_channels = kernel.shape
    shape = (batch, _out_size(height, kernel_h, stride, padding),
             _out_size(width, kernel_w, stride, padding), out_channels)
    return _ffi("kpn_onednn_conv_forward", shape, x, kernel, stride=stride, padding=padding)


def _convolution_fwd(x, kernel, stride, padding):
    return _convolution(x, kernel, stride, padding), (x, kernel)


def _convolution_bwd(stride, padding, residuals, grad_out):
    x, kernel = residuals
    # An unused gradient (the stem's input gradient) is removed by XLA: the custom calls
    # have no side effects.
    grad_x = _ffi("kpn_onednn_conv_backward_data", x.shape, grad_out, kernel, stride=stride,
                  padding=padding)
    grad_kernel = _ffi("kpn_onednn_conv_backward_weights", kernel.shape, x, grad_out,
                       stride=stride, padding=padding)
    return grad_x, grad_kernel


_convolution.defvjp(_convolution_fwd, _convolution_bwd)


def convolution(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """oneDNN's convolution, differentiable: ``lax.conv_general_dilated(x, kernel, (stride,
    stride), ((padding, padding),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``.

    Args:
      x: ``[B, H, W, Cin]`` float32.
      kernel: ``[kh, kw, Cin, Cout]`` float32.
      stride, padding: the same on both axes.

    Returns:
      ``[B, (H + 2p - kh) // s + 1, (W + 2p - kw) // s + 1, Cout]`` float32.

    Raises:
      OneDnnUnavailable: the library could not be built or loaded here.
      ValueError: not float32, or shapes that do not fit together.
    """
    require()
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(f"oneDNN convolution: expected float32 x and kernel, got {x.dtype} "
                         f"and {kernel.dtype}")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"oneDNN convolution: expected x [B, H, W, C] and kernel "
                         f"[kh, kw, C, out], got {x.shape} and {kernel.shape}")
    if stride < 1 or not 0 <= padding < min(kernel.shape[:2]):
        raise ValueError(f"oneDNN convolution: stride {stride}, padding {padding} for a "
                         f"{kernel.shape[0]}x{kernel.shape[1]} kernel")
    return _convolution(x, kernel, int(stride), int(padding))


def _self_check() -> None:
    """Compares forward and both gradients with XLA's convolution on small random arrays
    (stride 1 and 2): a library built against a mismatched oneDNN fails here, not later."""
    rng = np.random.default_rng(0)
    for stride, size, kernel_size, padding in ((1, 9, 3, 1), (2, 10, 3, 1), (2, 13, 7, 3)):
        x = jnp.asarray(rng.standard_normal((2, size, size, 5)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 5, 6)), jnp.float32)

        def ours(x, kernel):
            return _convolution(x, kernel, stride, padding)

        def xla(x, kernel):
            return jax.lax.conv_general_dilated(x, kernel, (stride, stride),
                                                ((padding, padding),) * 2,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision=jax.lax.Precision.HIGHEST)

        y, vjp = jax.vjp(ours, x, kernel)
        y_ref, vjp_ref = jax.vjp(xla, x, kernel)
        grad_y = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
        for name, got, want in zip(("forward", "input gradient", "kernel gradient"),
                                   (y, *vjp(grad_y)), (y_ref, *vjp_ref(grad_y))):
            got, want = np.asarray(got), np.asarray(want)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4,
                                                          atol=1e-4 * np.abs(want).max()):
                raise OneDnnUnavailable(
                    f"the built library's {name} (stride {stride}, {kernel_size}x{kernel_size}) "
                    f"differs from lax.conv_general_dilated: max |difference| "
                    f"{np.abs(got - want).max() if got.shape == want.shape else got.shape}")


@functools.cache
def _load() -> ctypes.CDLL | OneDnnUnavailable:
    """Builds, loads, registers and checks the library once per process; the error if any."""
    try:
        library = ctypes.CDLL(str(build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
        library.KpnOneDnnConvImplementation.restype = ctypes.c_char_p
        library.KpnOneDnnConvImplementation.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 11
        # Concrete arrays even when the first call comes from inside a jit trace.
        with jax.ensure_compile_time_eval(), \
                jax.default_device(jax.local_devices(backend="cpu")[0]):
            _self_check()
        return library
    except OneDnnUnavailable as error:
        return error
    except (OSError, AttributeError, RuntimeError) as error:
        return OneDnnUnavailable(f"loading the oneDNN convolution library failed: {error}")


def availability() -> tuple[bool, str]:
    """``(True, '')`` if :func:`convolution` works in this process, else ``(False, why)``.
    The first call builds and checks the library (seconds); later calls are free."""
    loaded = _load()
    if isinstance(loaded, OneDnnUnavailable):
        return False, str(loaded)
    return True, ""


def require() -> None:
    """Raises :class:`OneDnnUnavailable` (with the reason) unless oneDNN convolutions work."""
    loaded = _load()
    if isinstance(loaded, OneDnnUnavailable):
        raise loaded


def implementation(kind: str, input_shape: tuple[int, int, int, int],
                   kernel_shape: tuple[int, int, int, int], stride: int, padding: int) -> str:
    """The oneDNN implementation chosen for one convolution (e.g. ``'brgconv:avx512_core'``;
    ``'ref'`` would mean a slow reference kernel). kind: ``'forward'``, ``'backward_data'``
    or ``'backward_weights'``."""
    require()
    kinds = ("forward", "backward_data", "backward_weights")
    if kind not in kinds:
        raise ValueError(f"kind: expected one of {kinds}, got {kind!r}")
    batch, height, width, channels = input_shape
    kernel_h, kernel_w, _, out_channels = kernel_shape
    name = _load().KpnOneDnnConvImplementation(
        kinds.index(kind), batch, height, width, channels, kernel_h, kernel_w, out_channels,
        _out_size(height, kernel_h, stride, padding), _out_size(width, kernel_w, stride, padding),
        stride, padding)
    return name.decode()
