"""The test suite: unit/ (pure), integration/ (real server, kernels), e2e/ (browser, clusters),
harness/ (shared helpers)."""
