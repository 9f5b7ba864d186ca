"""Extraction worker: the numba engine and the job consumer."""
