"""The one exception type that the data package raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing path, too little data, an unknown name, a broken archive.

    The message is one paragraph that names the problem and how to fix it, so that the
    entry points can print it as it is instead of a traceback.
    """
