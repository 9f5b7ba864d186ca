"""CARD (Copernicus Analysis Ready Data) formats and physics.

Imports nothing of cbmflow's, so that the format readers and the test-world generator can be
reused and tested in isolation.
"""
