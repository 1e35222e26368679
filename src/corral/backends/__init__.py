"""Containment backends: one module (or folder) per kind, all behind `corral.backends.base`."""
