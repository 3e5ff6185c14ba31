"""Storage: the schema, migrations and the transactions that change state."""
