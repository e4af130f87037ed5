"""Other libraries' backbone weight layouts (Hugging Face transformers, timm) <-> official key names."""
