"""H2 pre-LLM token stages (one file per method); registered in `llavakit.compression.methods`."""
