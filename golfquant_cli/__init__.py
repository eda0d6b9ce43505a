"""The golfquant command line: parses flags, calls the library, renders tables or JSON."""
