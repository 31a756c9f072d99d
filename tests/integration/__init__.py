"""Tests against a real Jupyter Server with the extension and/or real kernels."""
