"""wise: placeholder."""
