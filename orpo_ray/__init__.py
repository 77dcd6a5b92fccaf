"""orpo-ray: ORPO preference optimisation from a laptop to a Ray cluster."""

__version__ = "0.1.0"
