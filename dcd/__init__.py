"""dcd: Dynamic Contrastive Distillation for image-text retrieval."""
__version__ = "0.1.0"
