"""The one lock for tracing in a process: torch.export and torch.compile must take turns.

Both push and pop global tracing state (dispatch-mode stacks, the FX patcher,
Dynamo's tracing context) that is not safe to share between threads: an
export running while another thread compiles fails with "Trying to pop empty
mode stack" and leaves later exports broken ("Unable to cast NotImplemented
to Tensor"). Capture holds this lock; so does the server's compile thread. It
is reentrant so that a compile started from inside a capture cannot deadlock.
"""

from __future__ import annotations

import threading

__all__ = ["TRACE_LOCK"]

TRACE_LOCK = threading.RLock()
