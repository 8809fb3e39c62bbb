"""Curation inside other training frameworks (optional: each module imports its framework)."""
