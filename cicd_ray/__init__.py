"""cicd-ray: a distributed CI/CD build runtime on Ray."""

__version__ = "0.1.0"
