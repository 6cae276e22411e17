"""Data layer: the public Med-MAT format, safe image loading, ingest, QA construction, Med-MAT-mini."""
