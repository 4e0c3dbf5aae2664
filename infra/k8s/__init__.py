"""Prefect Kubernetes work-pool base job templates for the apo-gpu and apo-cpu pools, and their renderer."""
