"""Where runs are kept and looked at: the store and its repair, the MLflow UI, the team server."""
