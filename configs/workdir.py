"""The config a trained workdir was trained with: ``--config=configs/workdir.py:WORKDIR``.

``run.py --mode=evaluate`` and ``--mode=predict`` use it when no ``--config`` is given, so
``--config.field=value`` overrides apply on top of the workdir's own config. Fields the
saved config lacks (added after it was written) keep their defaults.
"""

import json
from pathlib import Path

from configs import default, landmarks
from kpn_jax import workdir_config


def get_config(workdir: str):
    saved_path = Path(workdir).expanduser() / workdir_config.CONFIG_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    base = landmarks.get_config() if saved.get("task") == "landmarks" else default.get_config()
    return workdir_config.load(workdir, base)
