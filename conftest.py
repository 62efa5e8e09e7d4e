"""Repo-root conftest: makes `configs` and `benchmarks` importable in tests."""


def pytest_collection_modifyitems(session, config, items):
    """The longest test files first: with `make test`'s two processes (one file each at a
    time, in this order: `--no-loadscope-reorder`) they then run beside the many short
    ones instead of after them."""
    # Files 1 and 3 start on one process, 2 and 4 on the other (xdist hands out two each).
    first = ("test_faults.py", "test_multiprocess.py", "test_train.py", "test_object_storage.py")
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first
               else len(first))
