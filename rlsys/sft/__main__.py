"""``python -m rlsys.sft``: see :mod:`rlsys.sft.train`."""

from rlsys.sft.train import main

if __name__ == "__main__":
    raise SystemExit(main())
