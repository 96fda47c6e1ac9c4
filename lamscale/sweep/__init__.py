"""`lamscale sweep`: the paper's question as a command — LAM variants against vanilla baselines, over seeds,
as Ray Tune trials that are ordinary lamscale runs; then tables with intervals, a plot and HParams.

grid.py (the grid and the paper's variants → trial configs), tune.py (Ray Tune over the same TorchTrainer
training uses; resumable), stats.py (mean ± std, paired bootstrap intervals), report.py (sweep.json,
sweep.md, PNG, TensorBoard HParams).
"""
