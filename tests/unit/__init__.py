"""Tests of pure code: no Jupyter server, no kernel (in-process shells, SQLite, loopback fakes)."""
