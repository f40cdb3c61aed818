"""Target and device profiles."""
