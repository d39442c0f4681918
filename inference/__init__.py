"""Self-hosted batch inference on Ray.

The public Python API is small: read a job's results, and the error tree. Everything else is
reached through the ``inference`` command, the HTTP API, or the modules themselves.
"""

from inference.errors import (
    ConfigError,
    EngineFatalError,
    InferenceError,
    InputError,
    PermanentError,
    QueueError,
    TransientError,
)
from inference.shards import read_results

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EngineFatalError",
    "InferenceError",
    "InputError",
    "PermanentError",
    "QueueError",
    "TransientError",
    "__version__",
    "read_results",
]
