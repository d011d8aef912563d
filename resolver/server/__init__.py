"""The server: listening transports, the pipeline, assembly and lifecycle, worker processes."""
