"""Seeded fake data generators for tests (committed, so every test sees the same bytes)."""
