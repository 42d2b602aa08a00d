"""Benchmarks of kvquant_hf, one module per question; run from the repository root as
``python -m benchmarks.<name>`` (``benchmarks/run_gpu.sh NAME...`` runs the GPU ones). Each writes
``benchmarks/results/<name>.md`` / ``.json`` and appends its rows to ``benchmarks/results/history.csv``."""
