"""Sentinel-1 IW/EW GRD → calibrated, noise-removed, geocoded backscatter (CARD-BS).

Formats (``safe``) are kept apart from physics (``calibration``, ``orbit``, ``geocode``, ``rtc``)
as sarsen separates them, so that each formula can be tested against the annotation alone.
Imports nothing of cbmflow's.
"""
