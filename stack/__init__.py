"""The local stack: the ``credit-risk`` command, and starting, watching and stopping the
processes (MLflow tracking server, MLServer, logging sidecar) that ``credit-risk up`` runs
on one machine. Containers are the other way to run them (``docker-compose.yml``)."""
