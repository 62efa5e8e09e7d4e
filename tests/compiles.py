"""Counting how often a trainer compiles its train step (jax.log_compiles lines)."""

import logging

import jax


class _TrainStepCompiles(logging.Handler):
    """Counts log_compiles lines of jit(step) whose first argument is an int32 scalar: the
    train state's step counter (an eval step starts with images)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Compiling jit(step) with global shapes and types "
                                          "(ShapedArray(int32[]"):
            self.count += 1


def train_step_compiles(run):
    """``(run(), how many times it compiled a train step)``."""
    handler = _TrainStepCompiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            result = run()
    finally:
        logger.removeHandler(handler)
    return result, handler.count
