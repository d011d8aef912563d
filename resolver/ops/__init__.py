"""Operating the resolver: configuration, errors, and metrics."""
