"""The engine layer: I/O and waiting, each written once (connection, reader, wait, publish, drivers)."""
