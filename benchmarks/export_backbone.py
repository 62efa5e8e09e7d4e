"""Writes a trained workdir's backbone as torchvision-keyed ``.safetensors`` weights, the
start (``config.init_from``, configs/paper.py's ``init=``) of other runs.

  python benchmarks/export_backbone.py WORKDIR OUT.safetensors

The evaluation weights of WORKDIR's best (else latest) checkpoint (the moving average
where the run kept one), ResNet only: heads are left out. It gives every row of a table
the same pretrained start (configs/paper.py, setting=regime with init=).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]


def export_backbone(workdir: str | Path, out: str | Path) -> dict:
    """Writes ``out``; returns ``{'depth', 'checkpoint', 'tensors'}``."""
    sys.path.insert(0, str(REPO))
    from kpn_jax import keypoints as kp_lib
    from kpn_jax import predict, workdir_config
    from kpn_jax.interop import torch_weights

    workdir = Path(workdir).expanduser().resolve()
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    info = workdir_config.data_info(workdir)
    _, variables, checkpoint = predict.restore_variables(
        config, workdir, int(info["image_size"]), kp_lib.get_schema(info["keypoint_schema"]).name)
    backbone = {collection: variables[collection]["backbone"]
                for collection in ("params", "batch_stats")}
    torch_weights.save_safetensors(backbone, config.model.depth, out)
    return {"depth": config.model.depth, "checkpoint": checkpoint,
            "tensors": len(torch_weights.resnet_to_torch(backbone, config.model.depth,
                                                         as_numpy=True))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    written = export_backbone(args.workdir, args.out)
    print(f"ResNet-{written['depth']} backbone of {args.workdir} ({written['checkpoint']}, "
          f"{written['tensors']} tensors) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
