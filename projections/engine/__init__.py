"""The projection engine: sources, processors, workers, the catalog, rebuilds and status."""
