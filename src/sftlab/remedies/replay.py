"""replay: placeholder."""
