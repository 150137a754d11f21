"""Fake upstreams for tests and benchmarks: real servers speaking real HTTP and SSE."""
