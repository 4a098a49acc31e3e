"""GRPO: ``python -m rlsys.grpo`` (:mod:`rlsys.grpo.run`), the controller (:mod:`.trainer`), the
generate-ahead pipeline (:mod:`.pipeline`), typed step records (:mod:`.records`), the pure math
(:mod:`.algorithm`), model inputs (:mod:`.sequences`), step metrics (:mod:`.metrics`) and
checkpoints (:mod:`.checkpoints`)."""
