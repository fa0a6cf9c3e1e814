"""Serving an exported model: :mod:`.predict` is the ``taft-predict`` command."""
