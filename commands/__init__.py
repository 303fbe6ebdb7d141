"""Command modules of the ``mask2former`` CLI (see ``mask2former.cli``)."""
