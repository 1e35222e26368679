"""Thin typed wrappers over Linux isolation mechanisms, each usable and testable alone."""
