"""DuckDB views and queries over traces. DuckDB is imported lazily, inside the functions that need it."""
