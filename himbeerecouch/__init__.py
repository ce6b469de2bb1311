"""himbeerecouch: run Python programs stored in CouchDB on a fleet of Raspberry Pis."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# The Debian package ships pycouchdb (which Debian does not package) in a private folder.
# Appended, not prepended: a system-wide python3-pycouchdb, when installed, wins.
_PRIVATE_LIBS = "/usr/lib/himbeerecouch/python"
if _os.path.isdir(_PRIVATE_LIBS) and _PRIVATE_LIBS not in _sys.path:
    _sys.path.append(_PRIVATE_LIBS)


def __getattr__(name: str):
    # The original's public API, loaded on use: program processes import this package too.
    if name == "broadcast_message":
        from .discovery import broadcast_message
        return broadcast_message
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["broadcast_message", "__version__"]
