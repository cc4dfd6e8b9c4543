"""Serving: MLServer with a strict mlserver-mlflow runtime that follows the registry's
Production version (``model.identity.PRODUCTION_MODEL_URI``) and answers the Open Inference
(V2) protocol over REST and gRPC."""
