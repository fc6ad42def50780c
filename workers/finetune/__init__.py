"""Fine-tuning inside Ray Train workers: labelled data, the training loop, versioned artifacts."""
