"""Benchmark suites behind ``dist-ft bench SUITE``; each returns a JSON-able dict."""
