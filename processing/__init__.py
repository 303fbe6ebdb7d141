"""Preprocessing, label encoding, post-processing and visualisation."""
