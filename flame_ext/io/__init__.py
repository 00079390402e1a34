"""File formats, each in one place: HF folders, DCP, safetensors writing, destinations, the manifest."""
