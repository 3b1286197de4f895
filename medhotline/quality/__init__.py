"""Quality control of finished calls: rules in YAML, a sans-I/O checker, the review queue and sealed reviews
(docs/quality.md)."""
