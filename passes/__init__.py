"""FX graph passes: canonicalize, detect, verify, rewrite. Each is a function Graph -> Graph or Graph -> sites."""
