"""fuseport test suite."""
