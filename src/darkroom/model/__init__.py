"""timm backbones: building, saving and loading them, running a saved version, and its metrics."""
