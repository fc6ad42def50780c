"""A label output: the protocol that writes it (lease, session, ownership, markers, manifest) and what reads it back
(committed files only, queries, similarity, reports, compaction). Its names are schemas.layout's."""
