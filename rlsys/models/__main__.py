"""``python -m rlsys.models``: build the tiny model, or prepare a real checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys

from rlsys.lang.vocab import required_tokens
from rlsys.models.checkpoints import prepare_checkpoint
from rlsys.models.families import FAMILIES
from rlsys.models.tiny import TinySpec, build_tiny_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="build the tiny random-weight model")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--family", choices=tuple(FAMILIES), default="qwen2_5_vl")
    c = sub.add_parser(
        "prepare",
        help="add a vocabulary's tokens (coordinate bins, GETok's grid, ChatRex's indices) to a real local checkpoint, "
        "and give a checkpoint whose tokenizer loads with other ids than it declares (the released Rex-Omni) a "
        "tokenizer.json that every loader reads right",
    )
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--coord-tokens", choices=("add", "map_last"), default="add")
    c.add_argument("--vocabulary", choices=("rex_bins", "getok", "chatrex"), default="rex_bins")
    c.add_argument("--getok-grid", type=int, default=32)
    c.add_argument("--chatrex-max-proposals", type=int, default=100)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "tiny":
            print(build_tiny_model(a.out, TinySpec(family=a.family), overwrite=a.overwrite))
        else:
            print(
                prepare_checkpoint(
                    a.checkpoint,
                    a.out,
                    a.coord_tokens,
                    required_tokens(a.vocabulary, a.getok_grid, a.chatrex_max_proposals),
                )
            )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # a wrong path or family: said, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
