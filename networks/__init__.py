"""The EDM2+ networks: the reference network (edm2plus), its faster paths, presets, FLOP counts, loading and export."""

from networks import fastpaths  # noqa: F401  registers the faster paths with networks.edm2plus (see there)
