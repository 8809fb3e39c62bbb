"""Paper artifacts (tables and figures) built from the committed results."""
