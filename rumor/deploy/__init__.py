"""Deployment generators: docker-compose, Kubernetes and per-host commands from a cluster spec."""
