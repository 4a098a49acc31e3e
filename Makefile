# The two commands of the README. Both create .venv/ and install everything on first use
# (scripts/setup_venv.sh; a second run reuses it), then run.
.PHONY: setup run grpo sft test lint bench bench-rewards

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

test: setup
	.venv/bin/python -m pytest -q tests $(ARGS)

sft: setup
	.venv/bin/python -m rlsys.sft $(ARGS)

bench: setup
	.venv/bin/python -m rlsys.bench $(ARGS)

bench-rewards: setup
	.venv/bin/python -m rlsys.bench.rewards
