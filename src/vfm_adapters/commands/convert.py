"""``vfm-adapters convert official-rein IN.pth OUT_DIR --config CONFIG``: the authors' weights as a run directory.

Reads the Rein authors' released checkpoint (``backbone.reins.*`` Rein tokens and the
mmdet Mask2Former head ``decode_head.*``) and, with ``--backbone``, their converted
DINOv2 (``dinov2_converted.pth``), builds the model ``CONFIG`` describes, loads every
tensor with its names and shapes checked, and writes a run directory, so that
``vfm-adapters eval OUT_DIR --data ...`` evaluates the authors' weights.
See docs/official_checkpoints.md.
"""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "convert the Rein authors' released checkpoint into a run directory (then: vfm-adapters eval OUT_DIR)"

KINDS = ("official-rein",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="what to convert: official-rein (the authors' mmseg checkpoint)")
    parser.add_argument("checkpoint", help="the authors' checkpoint, e.g. dinov2_rein_and_head.pth")
    parser.add_argument("output_dir", help="run directory to write (segmentor.json, head.safetensors, adapters/)")
    parser.add_argument("--config", required=True,
                        help="YAML/JSON config of the same model (e.g. examples/configs/paper/gtav_dinov2_l_rein.yaml)")
    parser.add_argument("--backbone", default=None,
                        help="the authors' converted DINOv2 (dinov2_converted.pth: patch 16, 512 px); stored in OUT_DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from vfm_adapters.seg.official_run import convert_official_rein

    output = convert_official_rein(args.checkpoint, args.output_dir, args.config, backbone=args.backbone,
                                   overwrite=args.overwrite, log=print)
    print(f"wrote {output}; evaluate with: vfm-adapters eval {output} --data NAME=TYPE:ROOT[:SPLIT]")
    return 0
