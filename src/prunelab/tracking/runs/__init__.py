"""One run's life in MLflow: the session, what it records, its model, resume, dead processes, the run commands."""
