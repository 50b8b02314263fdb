"""Training the demo model: corpus, tokenizer, loop, export (builds on services/model/)."""
