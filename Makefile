# The two commands of the README. Both create .venv/ and install everything on first use
# (scripts/setup_venv.sh; a second run reuses it), then run.
.PHONY: setup run grpo sft test test-fast lint bench bench-rewards

setup:
	@bash scripts/setup_venv.sh

# The main job on the embedded default: SFT -> GRPO -> eval of both -> runs/demo/report.md.
run: setup
	.venv/bin/python -m rlsys.demo $(ARGS)

# GRPO alone on configs/tiny_cpu.yaml; pass ARGS="run.init_checkpoint=runs/demo/sft/final run.steps=10" etc.
grpo: setup
	.venv/bin/python -m rlsys.grpo $(ARGS)

# ruff (configured in pyproject.toml): lint and formatting, as CI runs them before the tests.
lint: setup
	.venv/bin/ruff check rlsys actors rewards tests scripts
	.venv/bin/ruff format --check rlsys actors rewards tests scripts

# The whole suite (what CI runs, within its 90 minutes): every capability end to end. It prints the
# 25 slowest tests, the seconds per file and the total, so a change sees what it costs (the aim:
# 40 minutes from a fresh clone on 2 cores).
test: setup
	.venv/bin/python -m pytest -q tests --durations=25 $(ARGS)

# The edit loop: the tests that start no Ray, vLLM or DeepSpeed (conftest.py fails a test outside
# the `slow` mark that leaves Ray or torch.distributed running).
test-fast: setup
	.venv/bin/python -m pytest -q tests -m "not slow" --durations=10 $(ARGS)

sft: setup
	.venv/bin/python -m rlsys.sft $(ARGS)

bench: setup
	.venv/bin/python -m rlsys.bench $(ARGS)

bench-rewards: setup
	.venv/bin/python -m rlsys.bench.rewards
