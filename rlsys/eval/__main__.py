"""``python -m rlsys.eval``: see :mod:`rlsys.eval.evaluate`."""

from rlsys.eval.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
