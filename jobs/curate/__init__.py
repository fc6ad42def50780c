"""Curation jobs (schemas.curation): findings computed from what other jobs wrote, committed as one table."""
