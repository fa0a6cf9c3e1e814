"""Serving an exported model: :mod:`.predict` is the ``taft-predict`` command; :mod:`.export_check`
verifies an export before it is served."""
