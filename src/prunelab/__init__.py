"""prunelab: an experiment-tracking training service for neural-network pruning."""

import logging as _logging

__version__ = "0.1.0"

# Start-up messages that tell a prunelab user nothing, silenced before the libraries are imported: torch's "No CUDA
# runtime is found" on CPU-only machines, MLflow's "Creating initial MLflow database tables" and the schema migration
# steps of a new store. Their warnings and errors still show.
for _name, _level in (
    ("torch.utils.cpp_extension", _logging.ERROR),
    ("mlflow.store.db.utils", _logging.WARNING),
    ("alembic", _logging.WARNING),
):
    _logging.getLogger(_name).setLevel(_level)
