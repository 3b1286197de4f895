"""The ground layer, at the bottom: errors and exit codes, configuration, logging, the database (engines, schema,
migrations) and small shared helpers (canonical JSON, ids, times of day, YAML with line numbers, operator
identity). It imports no other package of the project; every other package may import it (docs/architecture.md).
"""
