"""Engines beyond the in-process one (``fedmeta.federation.engine``): Flower (``engines.flower``)."""
