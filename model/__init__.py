"""The credit-risk model as it travels to the registry: its input schema, its
preprocessing and the MLflow pyfunc that wraps preprocessing and classifier.

Everything in this package is shipped inside each logged model (``code_paths``), so it
imports nothing from the rest of the repository.
"""
