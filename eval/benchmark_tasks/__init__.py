"""The project's own benchmark tasks for `python -m eval benchmarks` (lm-eval YAML beside its JSONL
data, made by `python -m eval.benchmark_tasks.make`); always on the command's task path."""
