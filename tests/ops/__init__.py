"""Tests of the ops files: alerts, Alertmanager, Prometheus, collector, compose, dashboards."""
