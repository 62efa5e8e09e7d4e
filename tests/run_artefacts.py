"""What two runs of one training must agree on: ``metrics.jsonl`` (without timings),
``checkpoints/best.json`` and ``report/results.json``, compared within float tolerance."""

import json

import numpy as np

TIMING_KEYS = ("train/images_per_sec", "train/input_wait_fraction",
               "train/transfer_wait_fraction")


def artefacts(read) -> dict:
    """The artefacts of a workdir whose files ``read(relative name)`` returns as text."""
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in read("metrics.jsonl").splitlines()]
    return {"best": json.loads(read("checkpoints/best.json")),
            "results": json.loads(read("report/results.json")), "metrics": records}


def assert_close(a, b, path="") -> None:
    """Equal structure, floats within rtol 1e-3 / atol 1e-4, anything else equal."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            assert_close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=path)
    else:
        assert a == b, path
