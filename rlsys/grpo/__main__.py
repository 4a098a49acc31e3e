"""``python -m rlsys.grpo``: see :mod:`rlsys.grpo.run`."""

from rlsys.grpo.run import main

if __name__ == "__main__":
    raise SystemExit(main())
