"""Sentinel-1 IW SLC → n-day interferometric coherence on a map grid (CARD-COH).

Geocode-then-interfere, as COMPASS does: each date's bursts are deramped, interpolated (complex,
windowed sinc) at the radar position of every output pixel found by the CARD-BS backward geocoder
(:mod:`card.s1grd.geocode`), reramped, and freed of the geometric phase 4πR/λ; the coherence is
then a boxcar estimate on the map grid. Formats (``safe``) are kept apart from the TOPS physics
(``tops``), the interpolation kernel (``interp``) and the chain (``coh``). Imports nothing of
cbmflow's; ``synthetic`` (SLC bursts made from a ground scatterer field through real annotation
geometry) is for tests and benchmarks only.
"""
