"""The privacy gate's side: the attackers (blind guesses, classical and learned inpainting), the suite
that runs them on a release, its cache, the privacy scores, and the gate's rules in one module (gate)."""
