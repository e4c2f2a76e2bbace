"""Command-line interface of anomalib-dskd (``anomalib-dskd`` console script)."""
