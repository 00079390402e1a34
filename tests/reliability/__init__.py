"""Reliability and safety as tested properties.

A package, so its conftest and helpers never shadow tests/conftest.py.
"""
