"""What a run must answer for: the sensitive-site screen and the provenance record."""
