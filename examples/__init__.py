"""Runnable examples of nervus."""
