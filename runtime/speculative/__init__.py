"""Speculative decoding: drafters propose tokens, the target verifies them in one pass (docs/architecture.md)."""
