"""Checks, one file per thing checked; diagnose and the training guard call the same functions."""
