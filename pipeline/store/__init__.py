"""Zarr v3 storage formats: the only code that knows array names and attribute layouts."""
