"""bitbench.workers."""
