"""Measurements of the devbox service: load, AWS calls, cold start, package size, time to ready."""
