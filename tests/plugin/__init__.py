"""A third-party backend, as a user would write one, plugged by config (tests/test_plugins.py)."""
