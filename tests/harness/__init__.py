"""Shared test helpers: real servers, kernels, browsers, clusters and the loopback fake LLM."""
