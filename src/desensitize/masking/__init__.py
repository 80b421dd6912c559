"""Masks on a cell grid and where their cells come from: the grid itself (scores to masks, baselines,
fills), captum attribution, and the set templates built from it (the privacy-aware `restorability`
among them)."""
