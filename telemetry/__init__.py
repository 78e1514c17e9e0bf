"""OpenTelemetry set-up, metrics and the in-process stats aggregator.

This package never imports ``service``: it takes providers and settings as arguments.
"""
