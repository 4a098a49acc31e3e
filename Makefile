# The two commands of the README. Both create .venv/ and install everything on first use
# (scripts/setup_venv.sh; a second run reuses it), then run.
.PHONY: setup grpo test bench-rewards

setup:
	@bash scripts/setup_venv.sh

# The main job on the embedded default (configs/tiny_cpu.yaml); pass ARGS="run.steps=10 ..." for overrides.
grpo: setup
	.venv/bin/python -m rlsys.grpo $(ARGS)

test: setup
	.venv/bin/python -m pytest -q tests $(ARGS)

bench-rewards: setup
	.venv/bin/python -m rlsys.bench_rewards
