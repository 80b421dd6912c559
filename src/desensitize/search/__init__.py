"""The mask search: the candidates, what is measured of each, and the privacy-constrained choice."""
