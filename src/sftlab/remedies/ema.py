"""ema: placeholder (filled below)."""
