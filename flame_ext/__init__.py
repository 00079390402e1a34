"""flame-ext: get a Hugging Face checkpoint into a TorchTitan-based trainer, and know it arrived intact."""

__version__ = "0.1.0"
