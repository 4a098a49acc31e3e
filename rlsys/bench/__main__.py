"""``python -m rlsys.bench``: see :mod:`rlsys.bench.suite`."""

from rlsys.bench.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
