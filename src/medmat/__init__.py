"""MedMAT-CG: compositional-generalisation experiments for medical multimodal LLMs on Med-MAT."""

__version__ = "0.1.0"
