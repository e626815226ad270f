"""MLflow, by concern: ``runs/`` (one run's life), ``sweeps/`` (sweeps, their report and the regression gate),
``server/`` (the store, the UI and the team server)."""
