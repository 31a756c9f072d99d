"""The user journey end to end: a real browser, JupyterHub, Enterprise Gateway."""
