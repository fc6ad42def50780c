"""Review: people deciding about the rows of a review queue (or of a label-issues result), and what those decisions
change downstream (a fine-tune's labels)."""
