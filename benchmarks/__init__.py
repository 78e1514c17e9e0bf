"""Benchmarks of the report queries, and the naive ORM baseline they are measured against."""
