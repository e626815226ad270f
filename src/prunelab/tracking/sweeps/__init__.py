"""Sweeps in MLflow: the parent run, the Hydra callbacks, the report read back from the runs, the regression gate."""
