"""Image sources and the raw splits: reading a source (never downloading), and the seeded, stratified,
checksummed train / test / public shards in data/raw/."""
