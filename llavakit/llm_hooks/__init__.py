"""H5 in-LLM hooks and H6 KV-cache policies (one file per method); registered in `llavakit.compression.methods`."""
