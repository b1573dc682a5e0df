"""One module per stage of the loop, each declaring itself once as `STAGE = Stage(...)`; no stage imports another."""
