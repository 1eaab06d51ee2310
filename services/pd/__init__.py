"""Prefill and decode gRPC services over the async engine API; see README.md."""
