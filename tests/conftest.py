"""Shared pytest fixtures: the S3-compatible server is available to every test as ``s3_server``."""

pytest_plugins = ["tests.fixtures.s3"]
