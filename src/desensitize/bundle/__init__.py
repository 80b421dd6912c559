"""Making and proving a release bundle: the masks and fill applied to raw shards as they are read, the
random counterpart of a release, and the verifier (release.json's format is desensitize.release)."""
