"""Serving: MLServer with a strict mlserver-mlflow runtime that loads
``models:/credit-risk-model/Production`` and answers the Open Inference (V2) protocol."""
