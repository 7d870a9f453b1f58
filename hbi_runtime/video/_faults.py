"""Fault-injection readers for tests of the worker pool: a decoder that hangs, crashes, or eats memory.

Selected by name (``decoder="fault-hang"``...), so that they reach a spawned worker without pickling code.
They do nothing unless asked for by name; no production path names them.
"""

from __future__ import annotations

import os
import time

import numpy as np

from hbi_runtime.errors import UsageError


def open_fault_reader(name: str, path):
    if name == "fault-hang":  # a decoder stuck in native code (decord #373 holds the GIL while it spins)
        time.sleep(3600)
    elif name == "fault-crash":  # a segfault in a native decoder
        os._exit(139)
    elif name == "fault-memory":  # a decoder whose memory grows without bound (decord #157, #197)
        hog = []
        while True:
            hog.append(np.ones(32 * 2**20, dtype=np.uint8))  # touched pages: resident, not just reserved
            time.sleep(0.01)
    raise UsageError(f"unknown fault decoder {name!r} (known: fault-hang, fault-crash, fault-memory)")
