"""The stages a query passes through, one feature a module, in the order server.app writes."""
