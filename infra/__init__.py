"""Deployment material: work-pool job templates (infra/k8s) and local stack scripts."""
