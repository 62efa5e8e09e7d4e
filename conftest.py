"""Repo-root conftest: makes `configs` and `benchmarks` importable in tests."""


def pytest_collection_modifyitems(session, config, items):
    """The longest test files first: with `make test`'s two processes (one file each at a
    time) they then run beside the many short ones instead of after them."""
    first = ("test_faults.py", "test_multiprocess.py", "test_object_storage.py")
    items.sort(key=lambda item: 0 if item.path.name in first else 1)
