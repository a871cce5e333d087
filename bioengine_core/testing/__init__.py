"""Conformance suites and helpers for plugin authors (importable test classes, pytest plugin)."""
