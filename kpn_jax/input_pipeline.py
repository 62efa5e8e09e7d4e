"""Data: TFDS array_record sources -> grain -> per-process numpy batches.

Every global training batch holds ``B_l`` labelled and ``B_u`` unlabelled
examples (the paper's semi-supervised batches). The labelled stream walks the
labelled training set in a fresh permutation every epoch; the unlabelled stream
walks the ``unlabeled`` split together with the labelled training set (as in the
paper), its grades hidden. Example ``j`` of global batch ``s`` is a pure
function of ``(seed, s, j)``, so a run restarted at step ``s`` sees exactly the
batches it would have seen, and each process reads only its own slice of every
global batch.

Records of raw-pixel datasets are parsed straight from their bytes (:class:`RawRecords`),
one grain element is a whole local batch (:class:`Batches`), made in the training process
by threads or in spawned worker processes (:class:`Loading`); none of this changes the
batches.

A local batch is a dict of numpy arrays:
  ``image`` uint8 [B, H, W, 1], ``keypoints`` float32 [B, N, 2],
  ``keypoints_valid`` bool [B, N], ``grades`` int32 [B, 7] (-1 = not graded or
  hidden), ``labeled`` bool [B] (example from the labelled stream), and for
  evaluation ``mask`` bool [B] (False for padding).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, Sequence

import grain
import numpy as np

from kpn_jax import datasets
from kpn_jax import grades as grades_lib

ARRAY_KEYS = ("image", "keypoints", "keypoints_valid", "grades")


@dataclasses.dataclass
class DatasetHandle:
    """An opened dataset: random-access sources per split and what they hold."""

    name: str
    sources: dict
    image_size: int
    keypoint_schema: str
    num_examples: dict
    data_dir: str = ""   # the local folder it is read from (a copy, for data_dir on gs://)

    def split(self, split: str):
        if split not in self.sources:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has "
                             f"{sorted(self.sources)}")
        return self.sources[split]


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_threads() -> int:
    """Reading threads in the training process when no worker processes are used: one per
    CPU, at most 8 (reading a raw-pixel record holds the GIL for most of its 0.3 ms, so more
    threads add little; worker processes are what scales)."""
    return max(1, min(8, available_cpus()))


def default_num_workers(platform: str, local_devices: int, cpus: int | None = None) -> int:
    """Worker processes when ``config.num_data_workers`` is -1.

    None on a CPU backend, where one training step costs the CPUs far more than its batch
    (reading in this process is enough, and workers would take cores from the step). On an
    accelerator, half the CPUs, at most 4 per local device: one worker delivers about 2,900
    320 px examples/s (benchmarks/README.md), so 4 cover the fastest per-device step rates
    measured with room for slower host cores.
    """
    if platform == "cpu":
        return 0
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(cpus // 2, 4 * max(1, local_devices)))


@dataclasses.dataclass(frozen=True)
class Loading:
    """How examples are read: in ``num_workers`` worker processes (0: in the training
    process), by ``num_threads`` threads per process (None: one per CPU in the training
    process, none in a worker)."""

    num_threads: int | None = None
    num_workers: int = 0


def check_loading_config(config) -> None:
    """Raises ValueError for a ``num_data_workers`` below -1 or ``num_data_threads`` below 0."""
    if int(config.get("num_data_workers", -1)) < -1:
        raise ValueError(f"config.num_data_workers must be -1 (auto), 0 (read in the training "
                         f"process) or a number of processes, got {config.num_data_workers}")
    if int(config.get("num_data_threads", 0)) < 0:
        raise ValueError(f"config.num_data_threads must be 0 (default) or a number of threads, "
                         f"got {config.num_data_threads}")


def loading_for_config(config, platform: str | None = None,
                       local_devices: int | None = None) -> Loading:
    """The :class:`Loading` of ``config.num_data_threads`` (0: default) and
    ``config.num_data_workers`` (-1: :func:`default_num_workers` for the backend)."""
    check_loading_config(config)
    workers = int(config.get("num_data_workers", -1))
    if workers < 0:
        import jax

        workers = default_num_workers(platform or jax.default_backend(),
                                      jax.local_device_count() if local_devices is None
                                      else local_devices)
    return Loading(num_threads=int(config.get("num_data_threads", 0)) or None,
                   num_workers=workers)


def resolve_dataset_name(config) -> str:
    """The ``builder/config`` name to open (the synthetic knees' name from ``config.synthetic``)."""
    if config.dataset == datasets.SYNTHETIC_BUILDER:
        return datasets.synthetic_dataset_name(config.synthetic)
    return config.dataset


def open_dataset(config) -> DatasetHandle:
    """Opens ``config.dataset`` under ``config.data_dir``."""
    name = resolve_dataset_name(config)
    data_dir = datasets.readable_data_dir(
        config.data_dir, name, config.get("data_cache_dir", datasets.DEFAULT_CACHE))
    builder = datasets.open_builder(data_dir, name)
    info = builder.info
    image_size = int(info.metadata.get("image_size", 0) or info.features["image"].shape[0])
    schema = info.metadata.get("keypoint_schema", "kneel16")
    sources = builder.as_data_source()
    return DatasetHandle(name=name, sources=dict(sources), image_size=image_size,
                         keypoint_schema=schema,
                         num_examples={k: v.num_examples for k, v in info.splits.items()},
                         data_dir=data_dir)


def read_field(source, field: str, batch: int = 256) -> np.ndarray:
    """Reads one field of every record of a source, skipping image decoding."""
    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding()}
    # Re-open the same files with a decoder that leaves PNG bytes undecoded.
    fast = source.__class__(dataset_info=source.dataset_info, split=source.split, decoders=skip) \
        if hasattr(source, "dataset_info") else source
    values = []
    for start in range(0, len(fast), batch):
        records = fast.__getitems__(list(range(start, min(start + batch, len(fast)))))
        values += [r[field] for r in records]
    if not values:
        return np.zeros((0,), np.int32)
    if isinstance(values[0], bytes):
        return np.asarray([v.decode() for v in values])
    return np.stack(values)


def labeled_indices(grades: np.ndarray, subject_ids: np.ndarray, fraction: float, seed: int,
                    tasks: Sequence[str]) -> np.ndarray:
    """Indices of training examples used as labelled.

    Examples with no grade for any of ``tasks`` are never labelled. With
    ``fraction < 1`` whole subjects are kept (subject-level subsampling, fixed
    ``seed``), so both knees of a person are labelled or neither.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.labeled_fraction must be in (0, 1], got {fraction}")
    cols = [grades_lib.TASKS.index(t) for t in tasks]
    has_label = np.any(grades[:, cols] != grades_lib.MISSING, axis=1)
    index = np.flatnonzero(has_label)
    if fraction < 1.0:
        subjects = np.unique(subject_ids[index])
        rng = np.random.default_rng(seed)
        keep = rng.permutation(len(subjects))[: max(1, int(round(fraction * len(subjects))))]
        index = index[np.isin(subject_ids[index], subjects[keep])]
    if len(index) == 0:
        raise ValueError(f"no training example has a grade for any of the tasks {tuple(tasks)}")
    return index


def _example_proto():
    """TFDS's ``tf.train.Example`` protobuf class, its lazy modules resolved."""
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example


class RawRecords(Sequence):
    """The fields training and evaluation read of a raw-pixel dataset's split (DESIGN.md,
    section 3), parsed straight from its records: half the CPU of TFDS's generic decoding,
    which :func:`records` keeps for datasets in the older PNG format.

    Element ``i`` is ``{'image': uint8 [S, S, 1], 'keypoints': float32 [N, 2],
    'keypoints_valid': bool [N], 'grades': int32 [7], 'image_id': bytes}``, equal to the
    same fields of ``source[i]`` (tests/test_input_pipeline.py).
    """

    def __init__(self, source):
        self.records = source.data_source        # the array_record source: serialized bytes
        features = source.dataset_info.features
        self.image_shape = tuple(features["image"].shape)
        self.num_points = int(features["keypoints"].shape[0])
        self._example = _example_proto()

    # The proto class is looked up again where the object is unpickled (a data worker
    # process), in the thread that unpickles it, before any reading thread starts: TFDS
    # imports itself lazily, and on Python 3.11 two threads importing it at once can
    # deadlock (functools.cached_property's lock against the import lock), which hung a
    # worker, and with it the training, forever.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_example"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._example = _example_proto()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        feature = self._example.FromString(self.records[i]).features.feature
        return {
            "image": np.frombuffer(feature["image"].bytes_list.value[0],
                                   np.uint8).reshape(self.image_shape),
            "keypoints": np.asarray(feature["keypoints"].float_list.value,
                                    np.float32).reshape(self.num_points, 2),
            "keypoints_valid": np.asarray(feature["keypoints_valid"].int64_list.value, bool),
            "grades": np.asarray(feature["grades"].int64_list.value, np.int32),
            "image_id": feature["image_id"].bytes_list.value[0],
        }


def records(source):
    """``source`` read through :class:`RawRecords` when it is a TFDS array_record source of
    a raw-pixel dataset; otherwise ``source`` itself."""
    if isinstance(source, RawRecords) or not (hasattr(source, "data_source")
                                              and hasattr(source, "dataset_info")):
        return source
    if datasets.stores_png(source.dataset_info):
        return source
    return RawRecords(source)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, stream: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng((seed, stream, epoch)).permutation(size)


class Pool:
    """Several (source, indices) pairs seen as one random-access collection."""

    def __init__(self, parts: Sequence[tuple[object, np.ndarray]]):
        self.parts = [(records(src), np.asarray(idx, np.int64)) for src, idx in parts
                      if len(idx)]
        self.offsets = np.cumsum([0] + [len(idx) for _, idx in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, k: int) -> dict:
        part = int(np.searchsorted(self.offsets, k, side="right") - 1)
        source, idx = self.parts[part]
        return source[int(idx[k - self.offsets[part]])]


def global_row(row: int, global_sizes: Sequence[int]) -> tuple[int, int]:
    """Row ``row`` of a global batch laid out source after source (all of source 0's
    examples, then source 1's, ...) -> ``(source, row within it)``.

    Each process holds a contiguous block of rows (``jax.make_array_from_process_local_data``),
    so with this layout the global batch, and so the augmentation each example gets, is the
    same whatever the number of processes: a run resumed on another number of hosts goes
    on as it would have.
    """
    for source, size in enumerate(global_sizes):
        if row < size:
            return source, row
        row -= size
    raise IndexError(f"row {row} is past the global batch of {sum(global_sizes)}")


class MixedStream(Sequence):
    """Element ``i`` of a process's stream of training examples.

    Element ``i`` belongs to global step ``s = i // L`` (``L`` = local batch); it is row
    ``p L + i % L`` of that step's global batch (``p`` = process index), whose first
    ``B_l`` rows are labelled and the rest unlabelled (:func:`global_row`).
    """

    def __init__(self, labeled: Pool, unlabeled: Pool | None, batch_labeled: int,
                 batch_unlabeled: int, num_steps: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        for name, size in (("batch_size", batch_labeled), ("unlabeled_batch_size", batch_unlabeled)):
            if size % process_count:
                raise ValueError(f"config.{name}={size} must divide by the {process_count} processes")
        if batch_unlabeled and (unlabeled is None or len(unlabeled) == 0):
            raise ValueError("coherence learning needs unlabelled examples but the pool is empty")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.global_sizes = (batch_labeled, batch_unlabeled)
        self.local_sizes = (batch_labeled // process_count, batch_unlabeled // process_count)
        self.local_batch = sum(self.local_sizes)
        self.num_steps, self.seed, self.process_index = num_steps, seed, process_index

    def __len__(self) -> int:
        return self.num_steps * self.local_batch

    def _draw(self, pool: Pool, stream: int, position: int) -> dict:
        epoch, k = divmod(position, len(pool))
        return pool[int(_epoch_permutation(self.seed, stream, epoch, len(pool))[k])]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, j = divmod(i, self.local_batch)
        source, row = global_row(self.process_index * self.local_batch + j, self.global_sizes)
        position = step * self.global_sizes[source] + row
        if source == 0:
            example = dict(self._draw(self.labeled, 0, position))
            example["labeled"] = True
        else:
            example = dict(self._draw(self.unlabeled, 1, position))
            example["grades"] = np.full_like(example["grades"], grades_lib.MISSING)
            example["labeled"] = False
        return example


def make_example_checker(image_size: int, num_points: int, need_keypoints: bool):
    """Returns a function that validates one decoded example and keeps its arrays."""

    def check(example: dict) -> dict:
        image_id = example.get("image_id", b"?")
        image_id = image_id.decode() if isinstance(image_id, bytes) else image_id
        image = np.asarray(example["image"])
        if image.shape != (image_size, image_size, 1):
            raise ValueError(f"example {image_id!r}: image shape {image.shape}, expected "
                             f"{(image_size, image_size, 1)}")
        keypoints = np.asarray(example["keypoints"], np.float32)
        valid = np.asarray(example["keypoints_valid"], bool)
        if keypoints.shape != (num_points, 2):
            raise ValueError(f"example {image_id!r}: keypoints shape {keypoints.shape}, expected "
                             f"{(num_points, 2)}")
        if need_keypoints and not (valid.all() and np.isfinite(keypoints).all()):
            raise ValueError(
                f"example {image_id!r}: keypoint-pooling needs every keypoint, but "
                f"{int((~valid).sum())} are missing; fill them with the landmark detector or "
                "use config.model.pooling='global'")
        out = {"image": image, "keypoints": np.nan_to_num(keypoints),
               "keypoints_valid": valid, "grades": np.asarray(example["grades"], np.int32)}
        if "labeled" in example:
            out["labeled"] = np.bool_(example["labeled"])
        return out

    return check


def _read_options(num_threads: int | None, in_workers: bool, prefetch: int) -> grain.ReadOptions:
    """Reading threads per process: ``num_threads``, or by default one per CPU in this process
    and none in a worker process (which then reads in its own loop, using one core)."""
    if num_threads is None:
        num_threads = 0 if in_workers else default_num_threads()
    if num_threads == 0:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=num_threads,
                             prefetch_buffer_size=max(1, prefetch, num_threads))


def _in_workers(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """``dataset`` produced by ``num_workers`` spawned processes (0: in this process).

    Worker ``w`` of ``n`` makes elements ``w, w + n, ...`` and the parent reads them back
    in order, through shared memory, so the batches do not depend on ``num_workers``.
    """
    if num_workers <= 0:
        return dataset
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain hands its absl flags to the workers
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                            per_worker_buffer_size=2))


def _iterate(dataset: grain.MapDataset, loading: Loading, prefetch: int) -> Iterator[dict]:
    read = _read_options(loading.num_threads, loading.num_workers > 0, prefetch)
    return iter(_in_workers(dataset.to_iter_dataset(read), loading.num_workers))


class Batches(Sequence):
    """Element ``s`` = the checked examples ``s * size .. (s + 1) * size - 1`` of
    ``examples``, stacked: one grain element per batch, so grain's per-element work is paid
    once per batch."""

    def __init__(self, examples: Sequence, checker, size: int):
        self.examples, self.checker, self.size = examples, checker, size

    def __len__(self) -> int:
        return len(self.examples) // self.size

    def __getitem__(self, s: int) -> dict:
        if not 0 <= s < len(self):
            raise IndexError(s)
        checked = [self.checker(self.examples[s * self.size + j]) for j in range(self.size)]
        return {key: np.stack([c[key] for c in checked]) for key in checked[0]}


def train_iterator(stream: MixedStream, checker, start_step: int = 0,
                   loading: Loading = Loading(), prefetch: int = 4) -> Iterator[dict]:
    """Local batches of ``stream`` from global step ``start_step`` on, read as ``loading``
    says; the batches do not depend on ``loading``."""
    dataset = grain.MapDataset.source(Batches(stream, checker, stream.local_batch))
    return _iterate(dataset.slice(slice(start_step, None)), loading, prefetch)


class _PaddedEval(Sequence):
    """Element ``i`` of a process's padded evaluation batches (see :func:`eval_batches`)."""

    def __init__(self, source, global_batch_size: int, checker, process_index: int,
                 process_count: int):
        self.source, self.checker = records(source), checker
        self.global_batch_size, self.local = global_batch_size, global_batch_size // process_count
        self.process_index, self.total = process_index, len(source)
        self.num_batches = max(1, -(-self.total // global_batch_size))

    def __len__(self) -> int:
        return self.num_batches * self.local

    def __getitem__(self, i: int) -> dict:
        step, j = divmod(i, self.local)
        position = step * self.global_batch_size + self.process_index * self.local + j
        checked = self.checker(dict(self.source[position if position < self.total else 0]))
        checked["mask"] = np.bool_(position < self.total)
        return checked


def eval_batches(source, global_batch_size: int, checker, process_index: int = 0,
                 process_count: int = 1, loading: Loading = Loading()) -> Iterator[dict]:
    """Padded local batches covering ``source`` once, in order, with ``mask`` [B].

    Every process yields the same number of batches (multi-host collectives need
    it); padding repeats record 0 with ``mask = False``.
    """
    if global_batch_size % process_count:
        raise ValueError(f"eval batch size {global_batch_size} must divide by {process_count} processes")
    padded = _PaddedEval(source, global_batch_size, checker, process_index, process_count)
    dataset = grain.MapDataset.source(Batches(padded, lambda example: example, padded.local))
    return _iterate(dataset, loading, prefetch=2)
