"""The DNS message layer: constants, wire decoding and encoding, names, queries, replies."""
