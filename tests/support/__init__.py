"""Helpers shared by the test packages: running the service, making images, training fixtures."""
