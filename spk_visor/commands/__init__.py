"""One thin module per command group: parse, call one library function, show, map errors."""
