"""cbmflow shared kernel: settings, database, bus, message contract, logging, errors and the CLI."""

__version__ = "0.1.0"
