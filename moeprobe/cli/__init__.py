"""Command-line interface: one module per command, each with ``main(argv) -> int``."""
