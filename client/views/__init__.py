"""Everything a person reads: rich rendering, and text from the instance made safe to show."""
