"""Fixed-point evaluator: trajectory capture, analysis, attention/stage metrics, plots."""
