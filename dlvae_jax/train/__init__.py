"""Training: state, the pure step, the runners that spread it over devices,
Orbax checkpoints, the loop, evaluation and prediction."""
