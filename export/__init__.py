"""edgekit package."""
