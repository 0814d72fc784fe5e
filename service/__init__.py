"""bitbench.service."""
