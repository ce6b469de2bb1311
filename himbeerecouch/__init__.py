"""himbeerecouch: run Python programs stored in CouchDB on a fleet of Raspberry Pis."""

__version__ = "0.1.0"
