"""The TAFT paper's experiments in miniature: ``python -m simulations.experiments --help``."""
