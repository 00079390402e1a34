"""Reliability and safety as tested properties (a package, so its conftest and helpers never shadow tests/conftest.py)."""
