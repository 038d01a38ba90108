"""Command-line jobs of fnn-ray (run with ``python -m jobs.<name>``)."""
