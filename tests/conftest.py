"""Test-session settings.

The suite's models are tiny: one thread per process is faster for them than two (thread
start-up and synchronisation dominate), and it keeps subprocess tests from oversubscribing the
cores. Set before torch is imported so child processes inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
