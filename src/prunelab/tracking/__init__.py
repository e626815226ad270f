"""MLflow: tracking location, run recording, names."""
