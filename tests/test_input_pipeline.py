"""The input pipeline: worker processes and resumption give the same batches, the stored
format reads without decoding, datasets in the older PNG format still read."""

import logging
from pathlib import Path

import numpy as np
import pytest

from data_prep import synthetic_knee, tfds_util
from kpn_jax import datasets, input_pipeline


@pytest.fixture(scope="module")
def tiny_knees(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    name = synthetic_knee.build(data_dir, image_size=32, num_train=20, num_validation=6,
                                num_test=0, num_unlabeled=8)
    return data_dir, name


def tiny_stream(data_dir, name, num_steps=6, process_index=0, process_count=1):
    sources, _ = datasets.data_sources(data_dir, name)
    train, unlabeled = sources["train"], sources["unlabeled"]
    stream = input_pipeline.MixedStream(
        input_pipeline.Pool([(train, np.arange(len(train)))]),
        input_pipeline.Pool([(unlabeled, np.arange(len(unlabeled))),
                             (train, np.arange(len(train)))]),
        batch_labeled=4, batch_unlabeled=4, num_steps=num_steps, seed=3,
        process_index=process_index, process_count=process_count)
    return stream, input_pipeline.make_example_checker(32, 16, need_keypoints=True)


def collect(iterator):
    batches = [{k: np.array(v) for k, v in batch.items()} for batch in iterator]
    if hasattr(iterator, "close"):
        iterator.close()
    return batches


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.slow  # spawns worker processes
def test_worker_processes_and_a_resumed_start_give_the_same_batches(tiny_knees):
    stream, checker = tiny_stream(*tiny_knees)
    in_process = collect(input_pipeline.train_iterator(
        stream, checker, 0, input_pipeline.Loading(num_threads=2, num_workers=0)))
    assert len(in_process) == 6
    # Example j of batch s is a pure function of (seed, s, j): read directly, one by one.
    for s in (0, 5):
        for j in (0, 7):
            np.testing.assert_array_equal(in_process[s]["image"][j],
                                          checker(stream[s * stream.local_batch + j])["image"])
    assert in_process[0]["labeled"].tolist() == [True] * 4 + [False] * 4
    assert (in_process[0]["grades"][4:] == -1).all()

    workers = collect(input_pipeline.train_iterator(
        stream, checker, 0, input_pipeline.Loading(num_workers=2)))
    assert_same_batches(in_process, workers)
    resumed = collect(input_pipeline.train_iterator(
        stream, checker, 3, input_pipeline.Loading(num_workers=2)))
    assert_same_batches(in_process[3:], resumed)


def test_each_process_reads_its_own_slice_of_the_global_batch(tiny_knees):
    whole = collect(input_pipeline.train_iterator(*tiny_stream(*tiny_knees, num_steps=2)))
    halves = [collect(input_pipeline.train_iterator(
        *tiny_stream(*tiny_knees, num_steps=2, process_index=p, process_count=2)))
        for p in (0, 1)]
    # Process p holds rows [4p, 4p + 4) of the global batch, which is the one-process batch
    # (labelled rows first): the same examples in the same rows whatever the process count.
    for s in range(2):
        for key in ("image", "grades", "labeled"):
            np.testing.assert_array_equal(np.concatenate([h[s][key] for h in halves]),
                                          whole[s][key], err_msg=key)
    assert halves[0][0]["labeled"].all() and not halves[1][0]["labeled"].any()


@pytest.mark.slow  # spawns worker processes
def test_evaluation_batches_in_workers_cover_the_split_once_in_order(tiny_knees):
    data_dir, name = tiny_knees
    sources, _ = datasets.data_sources(data_dir, name)
    source = sources["validation"]
    checker = input_pipeline.make_example_checker(32, 16, need_keypoints=True)
    for loading in (input_pipeline.Loading(), input_pipeline.Loading(num_workers=2)):
        batches = collect(input_pipeline.eval_batches(source, 4, checker, loading=loading))
        mask = np.concatenate([b["mask"] for b in batches])
        images = np.concatenate([b["image"] for b in batches])[mask]
        assert len(batches) == 2 and mask.sum() == len(source) == 6
        np.testing.assert_array_equal(images, np.stack([source[i]["image"] for i in range(6)]))


def test_built_records_are_raw_pixels_in_uncompressed_files(tiny_knees):
    from array_record.python import array_record_module

    data_dir, name = tiny_knees
    directory = datasets.dataset_dir(data_dir, name)
    files = sorted(directory.glob("*.array_record-*"))
    assert files
    for path in files:
        reader = array_record_module.ArrayRecordReader(str(path))
        assert "uncompressed" in reader.writer_options_string().split(","), path
        reader.close()
    builder = datasets.open_builder(data_dir, name)
    assert not datasets.stores_png(builder.info)
    image = builder.as_data_source()["train"][0]["image"]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 1)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_records_read_the_same_fields_as_tfds(tiny_knees):
    data_dir, name = tiny_knees
    sources, _ = datasets.data_sources(data_dir, name)
    for source in sources.values():
        fast = input_pipeline.records(source)
        assert isinstance(fast, input_pipeline.RawRecords) and len(fast) == len(source)
        for i in range(len(source)):
            expected, got = source[i], fast[i]
            assert got.keys() <= expected.keys()
            for key, value in got.items():
                np.testing.assert_array_equal(value, expected[key], err_msg=key)
                assert np.asarray(value).dtype == np.asarray(expected[key]).dtype, key


def _png_builder_class():
    """A builder writing the older format: PNG-encoded ``image`` (kpn-jax datasets < 2.0.0)."""
    import tensorflow_datasets as tfds

    from data_prep import features

    class LegacyPngKnees(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            spec = features.example_features(16, 16)
            spec = {k: spec[k] for k in spec.keys()}
            spec["image"] = tfds.features.Image(shape=(16, 16, 1), dtype=np.uint8,
                                                encoding_format="png")
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(spec),
                                                  metadata=tfds.core.MetadataDict(image_size=16))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                example = features.make_example(
                    np.full((16, 16), 40 * i, np.uint8), np.ones((16, 2)), [i, 0, 0, 0, 0, 0, 0],
                    f"s{i}", f"legacy{i}", "R")
                example["image"] = png_bytes(example["image"])  # TFDS would need TensorFlow
                yield f"{i}", example

    return LegacyPngKnees


def test_a_dataset_in_the_older_png_format_still_reads_with_a_warning(tmp_path, caplog):
    builder = _png_builder_class()(data_dir=str(tmp_path))
    tfds_util.prepare(builder)
    name = "legacy_png_knees"
    with caplog.at_level(logging.WARNING):
        opened = datasets.open_builder(tmp_path, name)
    assert datasets.stores_png(opened.info)
    assert "stores PNG images" in caplog.text and "python -m data_prep.legacy_png_knees" \
        in caplog.text
    source = opened.as_data_source()["train"]
    np.testing.assert_array_equal(source[2]["image"], np.full((16, 16, 1), 80, np.uint8))
    assert input_pipeline.records(source) is source   # TFDS decodes the PNG


def test_worker_defaults_follow_the_backend_and_bad_values_are_named():
    import ml_collections

    assert input_pipeline.default_num_workers("cpu", 8, cpus=64) == 0
    assert input_pipeline.default_num_workers("gpu", 1, cpus=16) == 4
    assert input_pipeline.default_num_workers("gpu", 8, cpus=96) == 32
    assert input_pipeline.default_num_workers("tpu", 4, cpus=2) == 1
    config = ml_collections.ConfigDict(dict(num_data_workers=-1, num_data_threads=0))
    assert input_pipeline.loading_for_config(config, "gpu", 1) == input_pipeline.Loading(
        num_threads=None, num_workers=input_pipeline.default_num_workers("gpu", 1))
    config.num_data_workers = -2
    with pytest.raises(ValueError, match="config.num_data_workers"):
        input_pipeline.loading_for_config(config, "gpu", 1)
    config.num_data_workers, config.num_data_threads = 0, -1
    with pytest.raises(ValueError, match="config.num_data_threads"):
        input_pipeline.check_loading_config(config)


def test_raw_records_unpickled_in_a_fresh_process_has_imported_tfds_before_any_read(tiny_knees,
                                                                                   tmp_path):
    """A data worker unpickles the records, then reads them from several threads: TFDS must
    be imported by then, in the unpickling thread, because two threads importing it at
    once can deadlock on Python 3.11 (seen: a worker, and the training, hung forever)."""
    import pickle
    import subprocess
    import sys

    data_dir, name = tiny_knees
    sources, _ = datasets.data_sources(data_dir, name)
    raw = input_pipeline.records(sources["train"])
    assert isinstance(raw, input_pipeline.RawRecords)
    blob = tmp_path / "records.pkl"
    blob.write_bytes(pickle.dumps(raw))
    check = ("import pickle, sys; records = pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print('tensorflow_datasets' in sys.modules, list(records[0]['grades']))")
    result = subprocess.run([sys.executable, "-c", check, str(blob)], capture_output=True,
                            text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "True"
    assert result.stdout.strip().endswith(str(list(raw[0]["grades"])))
