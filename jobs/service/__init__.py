"""The job service: jobs as typed records with a state machine, their durable store, and admission policy."""
