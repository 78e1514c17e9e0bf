"""salon-reports: the reporting service of a salon-booking platform."""

__version__ = "0.1.0"
