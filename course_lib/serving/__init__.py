"""Chapter 04's serving engine (work in progress)."""
