"""Text-to-image around the model: captions and their datasets, the Qwen3 text encoder, stored
embeddings, the text training source and prompt sampling, and the built-in demo (digit pairs and
its taught encoder)."""
