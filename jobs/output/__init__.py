"""A label output read back: committed files only, queries, similarity."""
