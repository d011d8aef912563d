"""Asking upstream resolvers: the attempt plan, upstream health, and the UDP, TCP and TLS
transports that carry it."""
