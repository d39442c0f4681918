"""Fault injection for crash tests: off unless ``INFERENCE_FAULT`` names a step.

``INFERENCE_FAULT=after_write`` makes the process that reaches that step of the commit protocol
exit at once (``os._exit``, like a kill -9: no cleanup, no flush). With ``INFERENCE_FAULT_ONCE``
set to a folder, each step fires once (a marker file records it), so a restarted process goes on.
Steps: ``before_write``, ``after_write`` (worker), ``before_publish``, ``after_publish``,
``after_complete`` (WorkQueue); ``batch_recorded``, ``batch_created`` (a provider batch recorded in
the ledger and not yet created; created and its id not yet recorded).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def fault(step: str) -> None:
    """Crash here if a test asked for it."""
    wanted = os.environ.get("INFERENCE_FAULT")
    if not wanted or step not in wanted.split(","):
        return
    once = os.environ.get("INFERENCE_FAULT_ONCE")
    if once:
        marker = Path(once) / step
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return
    logger.error("fault injection: exiting at %s (pid %d)", step, os.getpid())
    os._exit(17)
