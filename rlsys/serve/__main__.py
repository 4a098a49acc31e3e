"""``python -m rlsys.serve``: see :mod:`rlsys.serve.app`."""

from rlsys.serve.app import main

if __name__ == "__main__":
    raise SystemExit(main())
