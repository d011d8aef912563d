"""Rule files: the rule model, the compiled matcher, and the loader."""
