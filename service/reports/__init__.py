"""Report endpoints, their cache-aside service and their SQL."""
